//! The validator: checks proxies against an httpbin-compatible judge and grades them.

pub mod check;
pub mod cycle;
pub mod geoip;
pub mod judge_answer;
pub mod raw_http;
pub mod tunnel;
