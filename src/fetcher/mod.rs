//! The fetcher: downloads proxy lists and turns them into proxy keys.

pub mod parse;
