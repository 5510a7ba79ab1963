//! HTTP/1.x, once, for every speaker in the tree: the API transport (server
//! side), the validator's absolute-URI client, the test farm (both sides) and
//! the gateway.
//!
//! Sans-IO in the style of ureq-proto: [`head`] parses request and response
//! heads under caps, [`body`] says how a body ends and decodes it from
//! whatever bytes have arrived, [`encode`] writes messages into one buffer.
//! None of them touch a socket or a clock; [`io`] is the thin driver that
//! reads and writes a `TcpStream` within deadlines.

pub mod body;
pub mod encode;
pub mod head;
pub mod io;

pub use body::{BodyDecoder, BodyError, Framing, Progress};
pub use encode::{
    encode_request, encode_request_head, encode_response, encode_response_head, reason,
    AnswerOptions,
};
pub use head::{
    parse_request, parse_response, split_authority, FramingError, HeadError, HeadLimits, Headers,
    RequestHead, ResponseHead, Target, Version,
};
