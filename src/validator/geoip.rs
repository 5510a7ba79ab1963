//! Country lookup for a proxy's address, from either a MaxMind/DB-IP `.mmdb`
//! database or Tor's geoip text files (free, and shipped with every Tor
//! install). The format is detected from the content, not the file name.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use maxminddb::PathElement;

/// The marker that starts a MaxMind DB's metadata section, near the file's end.
const MMDB_METADATA_MARKER: &[u8] = b"\xAB\xCD\xEFMaxMind.com";
/// The metadata section is within this many bytes of the end.
const MMDB_METADATA_WINDOW: usize = 128 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum GeoipError {
    #[error("cannot read geoip database {path:?}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("geoip database {path:?} looks like a .mmdb but cannot be opened: {reason}")]
    Mmdb { path: PathBuf, reason: String },
    #[error(
        "geoip database {path:?} is neither a .mmdb database nor a tor geoip file: \
         line {line}: {reason}"
    )]
    Format {
        path: PathBuf,
        line: usize,
        reason: String,
    },
    #[error("geoip database {path:?} holds no address ranges")]
    Empty { path: PathBuf },
}

/// A country database, read-only after opening; `Send + Sync`.
pub struct Geoip {
    source: Source,
}

enum Source {
    Mmdb(Box<maxminddb::Reader<Vec<u8>>>),
    Ranges(RangeTable),
}

impl std::fmt::Debug for Geoip {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.source {
            Source::Mmdb(_) => f.write_str("Geoip(mmdb)"),
            Source::Ranges(table) => write!(
                f,
                "Geoip(tor, {} v4 ranges, {} v6 ranges)",
                table.v4.len(),
                table.v6.len()
            ),
        }
    }
}

/// Sorted, non-overlapping-by-start ranges, searched by bisection.
#[derive(Default)]
struct RangeTable {
    v4: Vec<(u32, u32, [u8; 2])>,
    v6: Vec<(u128, u128, [u8; 2])>,
}

impl Geoip {
    pub fn open(path: &Path) -> Result<Geoip, GeoipError> {
        let bytes = std::fs::read(path).map_err(|source| GeoipError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Geoip::from_bytes(path, bytes)
    }

    /// Detects the format from `bytes`; `path` only names the file in errors.
    pub fn from_bytes(path: &Path, bytes: Vec<u8>) -> Result<Geoip, GeoipError> {
        let window_start = bytes.len().saturating_sub(MMDB_METADATA_WINDOW);
        let is_mmdb = bytes[window_start..]
            .windows(MMDB_METADATA_MARKER.len())
            .any(|window| window == MMDB_METADATA_MARKER);
        if is_mmdb {
            let reader =
                maxminddb::Reader::from_source(bytes).map_err(|error| GeoipError::Mmdb {
                    path: path.to_path_buf(),
                    reason: error.to_string(),
                })?;
            return Ok(Geoip {
                source: Source::Mmdb(Box::new(reader)),
            });
        }
        let table = parse_tor(&bytes).map_err(|(line, reason)| GeoipError::Format {
            path: path.to_path_buf(),
            line,
            reason,
        })?;
        if table.v4.is_empty() && table.v6.is_empty() {
            return Err(GeoipError::Empty {
                path: path.to_path_buf(),
            });
        }
        Ok(Geoip {
            source: Source::Ranges(table),
        })
    }

    /// The country of `ip` as an upper-case ISO 3166 alpha-2 code; `None`
    /// when unknown.
    pub fn lookup(&self, ip: IpAddr) -> Option<String> {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        };
        let code = match &self.source {
            Source::Mmdb(reader) => {
                let path = [PathElement::Key("country"), PathElement::Key("iso_code")];
                let found = reader.lookup(ip).ok()?;
                found.decode_path::<String>(&path).ok()??
            }
            Source::Ranges(table) => {
                let code = match ip {
                    IpAddr::V4(v4) => find(&table.v4, u32::from(v4))?,
                    IpAddr::V6(v6) => find(&table.v6, u128::from(v6))?,
                };
                String::from_utf8_lossy(&code).into_owned()
            }
        };
        let valid = code.len() == 2 && code.bytes().all(|b| b.is_ascii_alphabetic());
        valid.then(|| code.to_ascii_uppercase())
    }
}

fn find<T: Ord + Copy>(ranges: &[(T, T, [u8; 2])], ip: T) -> Option<[u8; 2]> {
    let after = ranges.partition_point(|&(start, _, _)| start <= ip);
    let &(_, end, code) = ranges.get(after.checked_sub(1)?)?;
    (ip <= end).then_some(code)
}

/// Parses Tor's `geoip` (`INTFROM,INTTO,CC`) and `geoip6`
/// (`ipv6from,ipv6to,CC`) lines; both may share one file. `Err` is the
/// 1-based line and what is wrong with it.
fn parse_tor(bytes: &[u8]) -> Result<RangeTable, (usize, String)> {
    let text = std::str::from_utf8(bytes)
        .map_err(|error| (0, format!("expected text, found binary data ({error})")))?;
    let mut table = RangeTable::default();
    for (index, line) in text.lines().enumerate() {
        let line_no = index + 1;
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let expected = || (line_no, "expected FROM,TO,CC".to_string());
        let mut fields = line.split(',').map(str::trim);
        let (Some(from), Some(to), Some(code), None) =
            (fields.next(), fields.next(), fields.next(), fields.next())
        else {
            return Err(expected());
        };
        let code: [u8; 2] = code.as_bytes().try_into().map_err(|_| expected())?;
        if code == *b"??" {
            continue;
        }
        if !code.iter().all(u8::is_ascii_alphabetic) {
            return Err((line_no, "expected a two-letter country code".to_string()));
        }
        let code = code.map(|b| b.to_ascii_uppercase());
        if let (Ok(from), Ok(to)) = (from.parse::<u32>(), to.parse::<u32>()) {
            if from > to {
                return Err((line_no, "range start is after its end".to_string()));
            }
            table.v4.push((from, to, code));
        } else if let (Ok(from), Ok(to)) = (
            from.parse::<std::net::Ipv6Addr>(),
            to.parse::<std::net::Ipv6Addr>(),
        ) {
            let (from, to) = (u128::from(from), u128::from(to));
            if from > to {
                return Err((line_no, "range start is after its end".to_string()));
            }
            table.v6.push((from, to, code));
        } else {
            return Err(expected());
        }
    }
    table.v4.sort_unstable_by_key(|range| range.0);
    table.v6.sort_unstable_by_key(|range| range.0);
    Ok(table)
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    fn open_text(text: &str) -> Result<Geoip, GeoipError> {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        file.write_all(text.as_bytes()).unwrap();
        Geoip::open(file.path())
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    const TOR: &str = "# Last updated based on ...\n\
        16777216,16777471,au\n\
        \n\
        3405803776,3405804031,AU\n\
        134744064,134744319,US\n\
        134744320,134744575,??\n\
        2001:db8::,2001:db8::ffff,DE\n\
        2001:db8:1::,2001:db8:1::ffff,??\n";

    #[test]
    fn tor_ranges_are_found_by_bisection() {
        let geoip = open_text(TOR).unwrap();
        assert_eq!(geoip.lookup(ip("1.0.0.0")).as_deref(), Some("AU"));
        assert_eq!(geoip.lookup(ip("1.0.0.255")).as_deref(), Some("AU"));
        assert_eq!(geoip.lookup(ip("1.0.1.0")), None);
        assert_eq!(geoip.lookup(ip("8.8.8.8")).as_deref(), Some("US"));
        assert_eq!(geoip.lookup(ip("0.0.0.1")), None);
        assert_eq!(geoip.lookup(ip("255.255.255.255")), None);
        assert_eq!(geoip.lookup(ip("::ffff:8.8.8.8")).as_deref(), Some("US"));
        assert_eq!(geoip.lookup(ip("2001:db8::12")).as_deref(), Some("DE"));
        assert_eq!(geoip.lookup(ip("2001:db8::1:0")), None);
    }

    #[test]
    fn unknown_country_is_none() {
        let geoip = open_text(TOR).unwrap();
        assert_eq!(geoip.lookup(ip("8.8.9.1")), None);
        assert_eq!(geoip.lookup(ip("2001:db8:1::5")), None);
    }

    #[test]
    fn a_file_of_neither_format_is_a_clear_error() {
        let error = open_text("hello world\n").unwrap_err();
        let shown = error.to_string();
        assert!(
            shown.contains("neither a .mmdb database nor a tor geoip file"),
            "{shown}"
        );
        assert!(shown.contains("line 1"), "{shown}");

        let mut file = tempfile::NamedTempFile::new().unwrap();
        file.write_all(&[0u8, 159, 146, 150, 1, 2]).unwrap();
        let shown = Geoip::open(file.path()).unwrap_err().to_string();
        assert!(shown.contains("binary data"), "{shown}");
    }

    #[test]
    fn bad_lines_name_their_number() {
        let shown = open_text("1,2,US\n5,3,US\n").unwrap_err().to_string();
        assert!(shown.contains("line 2"), "{shown}");
        assert!(open_text("1,2,U1\n").is_err());
        assert!(open_text("1,2,USA\n").is_err());
        assert!(open_text("1,2\n").is_err());
    }

    #[test]
    fn empty_and_missing_files_are_errors() {
        assert!(matches!(
            open_text("# nothing\n"),
            Err(GeoipError::Empty { .. })
        ));
        let missing = Geoip::open(Path::new("/nonexistent/geoip.mmdb")).unwrap_err();
        assert!(matches!(missing, GeoipError::Io { .. }));
    }

    /// A minimal MaxMind DB writer (format 2.0, 24-bit records), so that the
    /// reader is tested on a real database without shipping one: a binary
    /// search tree over the address bits, the 16-byte separator, a data
    /// section with one map per network, then the metadata marker and map.
    mod mmdb {
        use super::MMDB_METADATA_MARKER;

        pub enum Value<'a> {
            Str(&'a str),
            U16(u16),
            U32(u32),
            U64(u64),
            Map(Vec<(&'a str, Value<'a>)>),
            Array(Vec<Value<'a>>),
        }

        /// A control byte: the type in the top 3 bits (extended types in a
        /// second byte) and a size under 29 in the low 5.
        fn control(out: &mut Vec<u8>, kind: u8, size: usize) {
            let size = u8::try_from(size).ok().filter(|&size| size < 29);
            let size = size.expect("the test writer encodes short values only");
            if kind <= 7 {
                out.push(kind << 5 | size);
            } else {
                out.extend_from_slice(&[size, kind - 7]);
            }
        }

        /// An unsigned integer in as few big-endian bytes as it needs.
        fn unsigned(out: &mut Vec<u8>, kind: u8, n: u64) {
            let bytes = n.to_be_bytes();
            let zeros = bytes.iter().take_while(|&&b| b == 0).count();
            control(out, kind, bytes.len() - zeros);
            out.extend_from_slice(&bytes[zeros..]);
        }

        pub fn encode(value: &Value, out: &mut Vec<u8>) {
            match value {
                Value::Str(text) => {
                    control(out, 2, text.len());
                    out.extend_from_slice(text.as_bytes());
                }
                Value::U16(n) => unsigned(out, 5, u64::from(*n)),
                Value::U32(n) => unsigned(out, 6, u64::from(*n)),
                Value::U64(n) => unsigned(out, 9, *n),
                Value::Map(pairs) => {
                    control(out, 7, pairs.len());
                    for (key, value) in pairs {
                        encode(&Value::Str(key), out);
                        encode(value, out);
                    }
                }
                Value::Array(items) => {
                    control(out, 11, items.len());
                    for item in items {
                        encode(item, out);
                    }
                }
            }
        }

        #[derive(Clone, Copy)]
        enum Record {
            Empty,
            Node(usize),
            Data(usize),
        }

        /// A database of `ip_version` 4 or 6 mapping each network
        /// `(address as an integer, prefix length, data)` to its data. An
        /// IPv4 network in a version 6 database is `::a.b.c.d/(96 + len)`, as
        /// MaxMind writes them. Networks must not nest.
        pub fn database(ip_version: u16, networks: &[(u128, u32, Value)]) -> Vec<u8> {
            let bits: u32 = if ip_version == 4 { 32 } else { 128 };
            let mut nodes = vec![[Record::Empty; 2]];
            let mut data = Vec::new();
            for (network, prefix_len, value) in networks {
                let offset = data.len();
                encode(value, &mut data);
                let mut node = 0;
                for depth in 0..*prefix_len {
                    let bit = usize::from((network >> (bits - 1 - depth)) & 1 == 1);
                    if depth + 1 == *prefix_len {
                        nodes[node][bit] = Record::Data(offset);
                        break;
                    }
                    node = match nodes[node][bit] {
                        Record::Node(next) => next,
                        _ => {
                            nodes.push([Record::Empty; 2]);
                            nodes[node][bit] = Record::Node(nodes.len() - 1);
                            nodes.len() - 1
                        }
                    };
                }
            }
            // A record is a node index, `node_count` for "no data", or
            // `node_count + 16 + offset` into the data section.
            let node_count = nodes.len();
            let mut out = Vec::new();
            for record in nodes.iter().flatten() {
                let value = match *record {
                    Record::Empty => node_count,
                    Record::Node(next) => next,
                    Record::Data(offset) => node_count + 16 + offset,
                };
                let value = u32::try_from(value).expect("a small tree");
                out.extend_from_slice(&value.to_be_bytes()[1..]);
            }
            out.extend_from_slice(&[0; 16]);
            out.extend_from_slice(&data);
            out.extend_from_slice(MMDB_METADATA_MARKER);
            let metadata = Value::Map(vec![
                ("node_count", Value::U32(node_count as u32)),
                ("record_size", Value::U16(24)),
                ("ip_version", Value::U16(ip_version)),
                ("database_type", Value::Str("Test-Country")),
                ("languages", Value::Array(vec![Value::Str("en")])),
                ("binary_format_major_version", Value::U16(2)),
                ("binary_format_minor_version", Value::U16(0)),
                ("build_epoch", Value::U64(1_700_000_000)),
                (
                    "description",
                    Value::Map(vec![("en", Value::Str("proxy-pool test data"))]),
                ),
            ]);
            encode(&metadata, &mut out);
            out
        }

        /// `{"country": {"iso_code": code, "names": {"en": ...}}}`, the
        /// shape of GeoIP2 and DB-IP country records.
        pub fn country(code: &str) -> Value<'_> {
            Value::Map(vec![(
                "country",
                Value::Map(vec![
                    ("iso_code", Value::Str(code)),
                    ("names", Value::Map(vec![("en", Value::Str("Somewhere"))])),
                ]),
            )])
        }
    }

    fn open_bytes(bytes: &[u8]) -> Geoip {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        file.write_all(bytes).unwrap();
        Geoip::open(file.path()).unwrap()
    }

    fn v4(text: &str) -> u128 {
        u128::from(u32::from(text.parse::<std::net::Ipv4Addr>().unwrap()))
    }

    fn v6(text: &str) -> u128 {
        u128::from(text.parse::<std::net::Ipv6Addr>().unwrap())
    }

    #[test]
    fn an_ipv6_mmdb_finds_ipv4_and_ipv6_networks() {
        use mmdb::{country, Value};
        let no_country = Value::Map(vec![(
            "continent",
            Value::Map(vec![("code", Value::Str("EU"))]),
        )]);
        // Real GeoIP2 and DB-IP country databases are version 6, with the
        // IPv4 space under ::/96.
        let bytes = mmdb::database(
            6,
            &[
                (v4("127.1.0.0"), 96 + 16, country("de")),
                (v4("8.8.8.0"), 96 + 24, country("US")),
                (v4("10.0.0.0"), 96 + 8, no_country),
                (v4("192.0.2.0"), 96 + 24, country("XYZ")),
                (v6("2001:db8::"), 32, country("FR")),
            ],
        );
        let geoip = open_bytes(&bytes);
        assert_eq!(format!("{geoip:?}"), "Geoip(mmdb)");
        assert_eq!(geoip.lookup(ip("127.1.0.1")).as_deref(), Some("DE"));
        assert_eq!(geoip.lookup(ip("127.1.255.254")).as_deref(), Some("DE"));
        assert_eq!(geoip.lookup(ip("8.8.8.8")).as_deref(), Some("US"));
        assert_eq!(geoip.lookup(ip("::ffff:8.8.8.8")).as_deref(), Some("US"));
        assert_eq!(geoip.lookup(ip("2001:db8:5::1")).as_deref(), Some("FR"));
        // Misses: outside every network, a record without a country, and a
        // code that is not two letters.
        assert_eq!(geoip.lookup(ip("127.2.0.1")), None);
        assert_eq!(geoip.lookup(ip("8.8.9.8")), None);
        assert_eq!(geoip.lookup(ip("2001:db9::1")), None);
        assert_eq!(geoip.lookup(ip("10.1.2.3")), None);
        assert_eq!(geoip.lookup(ip("192.0.2.1")), None);
    }

    #[test]
    fn an_ipv4_mmdb_finds_its_networks_and_no_ipv6() {
        let bytes = mmdb::database(4, &[(v4("127.1.0.0"), 24, mmdb::country("NL"))]);
        let geoip = open_bytes(&bytes);
        assert_eq!(geoip.lookup(ip("127.1.0.200")).as_deref(), Some("NL"));
        assert_eq!(geoip.lookup(ip("::ffff:127.1.0.9")).as_deref(), Some("NL"));
        assert_eq!(geoip.lookup(ip("127.1.1.0")), None);
        assert_eq!(geoip.lookup(ip("2001:db8::1")), None);
    }

    #[test]
    fn a_broken_mmdb_is_reported_as_such() {
        let mut bytes = vec![0u8; 64];
        bytes.extend_from_slice(MMDB_METADATA_MARKER);
        bytes.extend_from_slice(b"garbage");
        let error = Geoip::from_bytes(Path::new("x.mmdb"), bytes).unwrap_err();
        assert!(matches!(error, GeoipError::Mmdb { .. }), "{error}");
    }
}
