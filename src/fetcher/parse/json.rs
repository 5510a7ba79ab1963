//! JSON lists: one document (an array of entries, or an object holding such
//! arrays under any key, however named) or JSON lines (an entry a line). An
//! entry is a string, read as a text line, or an object, read by its fields
//! (`ip`/`host`/`address` + `port`, or `proxy`/`url`, with `protocol`/`type`/
//! `protocols`, `username`/`user`, `password`/`pass`); other fields are
//! ignored. A document's arrays are streamed, so that one cut at `max_bytes`
//! still gives the entries before the cut.

use std::fmt;

use serde::de::value::MapAccessDeserializer;
use serde::de::{DeserializeSeed, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use serde_json::{Map, Value};

use super::fields::{column, Column, Fields, Port};
use super::text::{parse_line, MAX_LINE_BYTES};
use super::{Collector, ListFormat, ParseOptions, ParsedList, Position, RejectReason};
use crate::proxy::Protocol;

/// A JSON line longer than this is rejected unread (objects with a
/// geolocation run to a kilobyte; none is this long).
const MAX_ENTRY_BYTES: usize = 64 * 1024;
/// How deep under a document's keys arrays of entries are looked for.
const MAX_DEPTH: usize = 4;

/// Whether a body that starts with `{` is JSON lines: its first line is a
/// whole object and another object follows.
pub(super) fn is_json_lines(text: &str) -> bool {
    let (first, rest) = text.split_once('\n').unwrap_or((text, ""));
    let first = first.trim();
    first.starts_with('{') && first.ends_with('}') && rest.trim_start().starts_with('{')
}

/// A JSON document; `truncated` says that a cut end is the download's, not
/// the list's fault.
pub(super) fn parse_document(text: &str, truncated: bool, options: &ParseOptions) -> ParsedList {
    let mut reader = Reader::new(ListFormat::Json, options, text.len() / 64);
    let mut deserializer = serde_json::Deserializer::from_str(text);
    let document = Node {
        reader: &mut reader,
        top: true,
        hint: None,
    };
    let result = document.deserialize(&mut deserializer);
    reader.finish_document();
    if let Err(err) = result {
        if !(truncated && err.is_eof()) {
            reader.entries += 1;
            let at = Position::Entry(reader.entries);
            reader.collector.reject(at, RejectReason::Malformed, || {
                format!("invalid JSON: {err}")
            });
        }
    }
    reader.collector.finish(reader.entries)
}

/// JSON lines; a line of text among them is read as a text line.
pub(super) fn parse_lines(text: &str, options: &ParseOptions) -> ParsedList {
    let mut reader = Reader::new(ListFormat::JsonLines, options, text.len() / 128);
    let mut lines = 0;
    for line in text.lines() {
        lines += 1;
        let at = Position::Line(lines);
        let trimmed = line.trim();
        if trimmed.is_empty() || trimmed.starts_with('#') || trimmed.starts_with("//") {
            continue;
        }
        if trimmed.len() > MAX_ENTRY_BYTES {
            let length = trimmed.len();
            reader.collector.reject(at, RejectReason::TooLong, || {
                format!("a line of {length} bytes")
            });
            continue;
        }
        match serde_json::from_str::<Value>(trimmed) {
            Ok(value) => reader.entry(at, &value, None),
            Err(err) => match parse_line(trimmed, options) {
                Ok(Some(key)) => reader.collector.add(key),
                // Not the text: a broken object may hold a password.
                _ => reader.collector.reject(at, RejectReason::Malformed, || {
                    format!("invalid JSON: {err}")
                }),
            },
        }
    }
    reader.collector.finish(lines)
}

struct Reader<'o> {
    collector: Collector,
    options: &'o ParseOptions,
    /// Entries numbered so far.
    entries: usize,
    /// A top-level object's own proxy fields (`ip`, `port`...).
    top: Map<String, Value>,
    top_is_object: bool,
    /// Entries found under a top-level object's keys, with the protocol of a
    /// key named after one; read once the object is known to be no proxy.
    pending: Vec<(Value, Option<Protocol>)>,
}

impl<'o> Reader<'o> {
    fn new(format: ListFormat, options: &'o ParseOptions, capacity_hint: usize) -> Reader<'o> {
        Reader {
            collector: Collector::new(format, capacity_hint),
            options,
            entries: 0,
            top: Map::new(),
            top_is_object: false,
            pending: Vec::new(),
        }
    }

    fn next_entry(&mut self, value: &Value, hint: Option<Protocol>) {
        self.entries += 1;
        self.entry(Position::Entry(self.entries), value, hint);
    }

    fn entry(&mut self, at: Position, value: &Value, hint: Option<Protocol>) {
        match value {
            Value::String(line) => {
                let options = ParseOptions {
                    default_protocol: hint.unwrap_or(self.options.default_protocol),
                    ..*self.options
                };
                let outcome = if line.len() > MAX_LINE_BYTES {
                    Err(RejectReason::TooLong)
                } else {
                    parse_line(line, &options)
                };
                self.collector.outcome(at, line, outcome);
            }
            Value::Object(map) => {
                let fields = Fields {
                    protocol_hint: hint,
                    ..fields_of(map)
                };
                self.collector.fields(at, &fields, self.options);
            }
            Value::Null => {}
            Value::Bool(_) | Value::Number(_) | Value::Array(_) => {
                let kind = match value {
                    Value::Bool(_) => "a boolean",
                    Value::Number(_) => "a number",
                    _ => "an array",
                };
                self.collector.reject(at, RejectReason::Malformed, || {
                    format!("{kind}, not a proxy")
                });
            }
        }
    }

    /// Collects the entries under `value`: an array's elements, a proxy
    /// object, or what is under an object's keys.
    fn walk(&mut self, value: Value, hint: Option<Protocol>, depth: usize) {
        match value {
            Value::Array(items) => self
                .pending
                .extend(items.into_iter().map(|item| (item, hint))),
            Value::Object(map) if fields_of(&map).names_a_proxy() => {
                self.pending.push((Value::Object(map), hint));
            }
            Value::Object(map) if depth < MAX_DEPTH => {
                for (key, value) in map {
                    let hint = named_protocol(&key).or(hint);
                    self.walk(value, hint, depth + 1);
                }
            }
            _ => {}
        }
    }

    /// A top-level object is one proxy when it names one; else its entries
    /// are those found under its keys.
    fn finish_document(&mut self) {
        if self.top_is_object {
            let top = std::mem::take(&mut self.top);
            if fields_of(&top).names_a_proxy() {
                self.pending.clear();
                self.next_entry(&Value::Object(top), None);
                return;
            }
            // `{"proxy": [...]}`: a proxy field's name holding the list.
            for (_, value) in top {
                self.walk(value, None, 1);
            }
        }
        for (value, hint) in std::mem::take(&mut self.pending) {
            self.next_entry(&value, hint);
        }
    }
}

fn named_protocol(key: &str) -> Option<Protocol> {
    match column(key) {
        Some(Column::Named(protocol)) => Some(protocol),
        _ => None,
    }
}

/// An object's proxy parts; values of other types than expected are ignored.
fn fields_of(map: &Map<String, Value>) -> Fields<'_> {
    let mut fields = Fields::default();
    for (key, value) in map {
        let Some(column) = column(key) else {
            continue;
        };
        match (column, value) {
            (Column::Port, Value::Number(number)) => {
                let port = number.as_u64().map_or(Port::Invalid, Port::Number);
                fields.port.get_or_insert(port);
            }
            (Column::Port, Value::Bool(_) | Value::Array(_) | Value::Object(_)) => {
                fields.port.get_or_insert(Port::Invalid);
            }
            (Column::Protocol, Value::Array(items)) => {
                for item in items {
                    if let Value::String(text) = item {
                        fields.set(Column::Protocol, text);
                    }
                }
            }
            (_, Value::String(text)) => fields.set(column, text),
            _ => {}
        }
    }
    fields
}

/// A value of the document: the document itself (`top`), or the value under
/// one of its keys. At the top an array's entries are read as they come and
/// an object keeps its proxy fields; under a key an array's entries are set
/// aside and an object is searched. Anything else is ignored.
struct Node<'r, 'o> {
    reader: &'r mut Reader<'o>,
    top: bool,
    hint: Option<Protocol>,
}

impl<'de> DeserializeSeed<'de> for Node<'_, '_> {
    type Value = ();

    fn deserialize<D: serde::Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Node<'_, '_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while let Some(value) = seq.next_element::<Value>()? {
            match self.top {
                true => self.reader.next_entry(&value, None),
                false => self.reader.pending.push((value, self.hint)),
            }
        }
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        if !self.top {
            let value = Value::deserialize(MapAccessDeserializer::new(map))?;
            self.reader.walk(value, self.hint, 1);
            return Ok(());
        }
        self.reader.top_is_object = true;
        while let Some(key) = map.next_key::<String>()? {
            let hint = match column(&key) {
                Some(Column::Named(protocol)) => Some(protocol),
                Some(_) => {
                    let value: Value = map.next_value()?;
                    self.reader.top.insert(key, value);
                    continue;
                }
                None => None,
            };
            map.next_value_seed(Node {
                reader: &mut *self.reader,
                top: false,
                hint,
            })?;
        }
        Ok(())
    }

    fn visit_bool<E: serde::de::Error>(self, _: bool) -> Result<(), E> {
        Ok(())
    }

    fn visit_i64<E: serde::de::Error>(self, _: i64) -> Result<(), E> {
        Ok(())
    }

    fn visit_u64<E: serde::de::Error>(self, _: u64) -> Result<(), E> {
        Ok(())
    }

    fn visit_f64<E: serde::de::Error>(self, _: f64) -> Result<(), E> {
        Ok(())
    }

    fn visit_str<E: serde::de::Error>(self, _: &str) -> Result<(), E> {
        Ok(())
    }

    fn visit_unit<E: serde::de::Error>(self) -> Result<(), E> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::parse_list;
    use super::super::testing::{assert_parsed, key, with_credentials, PUBLIC};
    use super::*;

    #[test]
    fn an_array_of_strings_reads_each_as_a_line() {
        assert_parsed(
            r#"["1.2.3.4:8080", "socks5://5.6.7.8:1080", "9.9.9.9:80:US", "", "10.0.0.1:80", 7]"#,
            ListFormat::Json,
            vec![
                key(Protocol::Http, "1.2.3.4", 8080),
                key(Protocol::Socks5, "5.6.7.8", 1080),
                key(Protocol::Http, "9.9.9.9", 80),
            ],
            6,
            &[
                "entry 5 rejected (not_public): 10.0.0.1:80",
                "entry 6 rejected (malformed): a number, not a proxy",
            ],
        );
    }

    #[test]
    fn objects_give_their_address_port_protocols_and_credentials() {
        // The shapes of monosans' proxies.json, proxifly, geonode and proxyscrape.
        let text = r#"[
          {"protocol": "socks4", "username": null, "password": null, "host": "1.2.3.4",
           "port": 7890, "timeout": 0.18, "exit_ip": "8.8.8.8",
           "geolocation": {"country": {"iso_code": "RU"}}},
          {"proxy": "http://5.6.7.8:80", "protocol": "socks5", "ip": "5.6.7.8", "port": "80"},
          {"proxy": "9.9.9.9:3128", "protocol": "HTTPS"},
          {"ip": "2.2.2.2", "port": "1080", "protocols": ["socks4", "socks5"]},
          {"address": "3.3.3.3:8080"},
          {"IP": "4.4.4.4", "Port": 80, "type": "http", "user": "u", "pass": "p"},
          {"ip": "6.6.6.6", "port": 0},
          {"ip": "7.7.7.7", "port": 80, "protocol": "ftp"},
          {"country": "US", "speed": 12},
          {"ip": "8.8.4.4", "port": 80, "password": "hunter2"}
        ]"#;
        assert_parsed(
            text,
            ListFormat::Json,
            vec![
                key(Protocol::Socks4, "1.2.3.4", 7890),
                // ip + port win over proxy; the protocol is the object's.
                key(Protocol::Socks5, "5.6.7.8", 80),
                key(Protocol::Https, "9.9.9.9", 3128),
                key(Protocol::Socks4, "2.2.2.2", 1080),
                key(Protocol::Socks5, "2.2.2.2", 1080),
                key(Protocol::Http, "3.3.3.3", 8080),
                with_credentials(key(Protocol::Http, "4.4.4.4", 80), "u", Some("p")),
            ],
            10,
            &[
                "entry 7 rejected (invalid_port): 6.6.6.6:0",
                "entry 8 rejected (unknown_scheme): ftp://7.7.7.7:80",
                "entry 9 rejected (malformed): no address",
                "entry 10 rejected (bad_credentials): ***@8.8.4.4:80",
            ],
        );
    }

    #[test]
    fn a_url_scheme_wins_over_the_objects_protocols() {
        let parsed = parse_list(
            r#"[{"url": "socks5://u:p@1.2.3.4:1080", "protocols": ["http", "https"]}]"#,
            &PUBLIC,
        );
        assert_eq!(
            parsed.proxies,
            vec![with_credentials(
                key(Protocol::Socks5, "1.2.3.4", 1080),
                "u",
                Some("p")
            )]
        );
    }

    #[test]
    fn an_object_holds_its_list_under_any_key() {
        for text in [
            r#"{"data": [{"ip": "1.2.3.4", "port": 80}], "total": 1, "page": 1}"#,
            r#"{"proxies": ["1.2.3.4:80"]}"#,
            r#"{"list": {"items": [{"ip": "1.2.3.4", "port": 80}]}}"#,
            r#"{"result": {"a": {"ip": "1.2.3.4", "port": 80}}}"#,
        ] {
            let parsed = parse_list(text, &PUBLIC);
            assert_eq!(
                parsed.proxies,
                vec![key(Protocol::Http, "1.2.3.4", 80)],
                "{text}"
            );
            assert_eq!(parsed.lines, 1, "{text}");
        }
        // Keys named after a protocol give their entries that protocol.
        let parsed = parse_list(
            r#"{"http": ["1.2.3.4:80"], "socks5": ["5.6.7.8:1080", "http://9.9.9.9:80"]}"#,
            &PUBLIC,
        );
        assert_eq!(
            parsed.proxies,
            vec![
                key(Protocol::Http, "1.2.3.4", 80),
                key(Protocol::Socks5, "5.6.7.8", 1080),
                key(Protocol::Http, "9.9.9.9", 80),
            ]
        );
    }

    #[test]
    fn an_object_that_names_a_proxy_is_one_entry_whatever_arrays_it_holds() {
        let parsed = parse_list(
            r#"{"host": "1.2.3.4", "port": 80, "type": "http", "export_address": ["5.6.7.8:80"]}"#,
            &PUBLIC,
        );
        assert_eq!(parsed.proxies, vec![key(Protocol::Http, "1.2.3.4", 80)]);
        assert_eq!(parsed.lines, 1);
    }

    #[test]
    fn json_lines_read_an_entry_a_line() {
        // fate0's shape.
        let text = "{\"anonymity\": \"high_anonymous\", \"host\": \"1.2.3.4\", \"port\": 80, \
            \"type\": \"http\", \"export_address\": [\"10.1.1.1:42721\", \"1.2.3.5\"]}\n\
            \n\
            {\"host\": \"5.6.7.8\", \"port\": 1080, \"type\": \"socks5\"}\n\
            {\"host\": \"9.9.9.9\", \"port\": 80, \"password\": \"hunter2\"\n\
            2.2.2.2:3128\n\
            {\"host\": \"1.2.3.4\", \"port\": 80, \"type\": \"http\"}\n";
        let parsed = parse_list(text, &PUBLIC);
        assert_eq!(parsed.format, ListFormat::JsonLines);
        assert_eq!(
            parsed.proxies,
            vec![
                key(Protocol::Http, "1.2.3.4", 80),
                key(Protocol::Socks5, "5.6.7.8", 1080),
                key(Protocol::Http, "2.2.2.2", 3128),
            ]
        );
        assert_eq!(
            (parsed.lines, parsed.rejected, parsed.duplicates),
            (6, 1, 1)
        );
        let reject = &parsed.first_rejects[0];
        assert_eq!(reject.at, Position::Line(4));
        assert!(reject.text.starts_with("invalid JSON"), "{}", reject.text);
        assert!(!reject.text.contains("hunter2"));
    }

    #[test]
    fn a_broken_document_keeps_what_came_before_the_break() {
        let parsed = parse_list(r#"["1.2.3.4:80", "5.6.7.8:80" "9.9.9.9:80"]"#, &PUBLIC);
        assert_eq!(parsed.proxies.len(), 2);
        assert_eq!((parsed.lines, parsed.rejected), (3, 1));
        let parsed = parse_list("{nope", &PUBLIC);
        assert_eq!((parsed.proxies.len(), parsed.rejected), (0, 1));
        assert_eq!(
            parsed.not_a_list(),
            Some("not a proxy list: the body is JSON")
        );
    }
}
