//! CSV and TSV lists: a header row that names the columns, then rows of
//! cells (quoted as CSV quotes them). A row with an address column is one
//! proxy (address, port, protocol, credentials; columns named after a
//! protocol are then the row's attributes, as free-proxy-list's `Https: yes`);
//! without one, every proxy cell of the row is read, and a column named
//! after a protocol (`http,https,socks4,socks5`) gives its cells that protocol.

use super::fields::{column, Column, Fields, Port};
use super::text::{parse_address, MAX_LINE_BYTES};
use super::{Collector, ListFormat, ParseOptions, ParsedList, Position};
use crate::proxy::Protocol;

/// The delimiters a header may use, most likely first.
const DELIMITERS: [u8; 4] = [b',', b'\t', b';', b'|'];

/// A list's header row.
pub(super) struct Header<'a> {
    cells: Vec<&'a str>,
    delimiter: u8,
    /// 1-based.
    line: usize,
    /// Where the rows start.
    rows_offset: usize,
}

/// The header, when the first line that is no blank or comment line names
/// columns: at least two cells, one naming an address, a proxy or a
/// protocol, and none an address itself (a data line is no header).
pub(super) fn find_header(text: &str) -> Option<Header<'_>> {
    let mut offset = 0;
    for (index, line) in text.split_inclusive('\n').enumerate() {
        offset += line.len();
        let content = line.trim();
        if content.is_empty() || content.starts_with('#') || content.starts_with("//") {
            continue;
        }
        if content.len() > MAX_LINE_BYTES {
            return None;
        }
        let count = |delimiter: &u8| content.bytes().filter(|b| b == delimiter).count();
        let delimiter = *DELIMITERS
            .iter()
            .rev()
            .max_by_key(|delimiter| count(delimiter))
            .filter(|delimiter| count(delimiter) > 0)?;
        let cells: Vec<&str> = content
            .split(char::from(delimiter))
            .map(|cell| cell.trim().trim_matches('"').trim())
            .collect();
        let names_proxies = cells.iter().any(|cell| {
            matches!(
                column(cell),
                Some(Column::Address | Column::Proxy | Column::Named(_))
            )
        });
        let holds_data = cells.iter().any(|cell| parse_address(cell).is_ok());
        return (cells.len() >= 2 && names_proxies && !holds_data).then_some(Header {
            cells,
            delimiter,
            line: index + 1,
            rows_offset: offset,
        });
    }
    None
}

pub(super) fn parse(text: &str, options: &ParseOptions) -> ParsedList {
    let lines = text.lines().count();
    let mut collector = Collector::new(ListFormat::Csv, text.len() / 32);
    let Some(header) = find_header(text) else {
        return collector.finish(lines);
    };
    let columns: Vec<Option<Column>> = header.cells.iter().map(|cell| column(cell)).collect();
    let find = |wanted: Column| columns.iter().position(|column| *column == Some(wanted));
    let address = find(Column::Address);
    let port = find(Column::Port);
    let protocol = find(Column::Protocol);
    let username = find(Column::Username);
    let password = find(Column::Password);
    let proxy_cells: Vec<(usize, Option<Protocol>)> = match address {
        Some(_) => Vec::new(),
        None => columns
            .iter()
            .enumerate()
            .filter_map(|(index, column)| match column {
                Some(Column::Proxy) => Some((index, None)),
                Some(Column::Named(protocol)) => Some((index, Some(*protocol))),
                _ => None,
            })
            .collect(),
    };
    let mut reader = ::csv::ReaderBuilder::new()
        .delimiter(header.delimiter)
        .has_headers(false)
        .flexible(true)
        .trim(::csv::Trim::All)
        .comment(Some(b'#'))
        .from_reader(&text.as_bytes()[header.rows_offset..]);
    let mut record = ::csv::StringRecord::new();
    // The rows are a `&str`'s, so UTF-8: reading them does not fail.
    while let Ok(true) = reader.read_record(&mut record) {
        let line = header.line + record.position().map_or(0, |p| p.line() as usize);
        let at = Position::Line(line);
        let cell = |index: Option<usize>| {
            index
                .and_then(|index| record.get(index))
                .filter(|cell| !cell.is_empty())
        };
        let mut fields = Fields {
            username: cell(username),
            password: cell(password),
            ..Fields::default()
        };
        fields.protocols.extend(cell(protocol));
        if address.is_some() {
            let Some(address) = cell(address) else {
                continue;
            };
            fields.address = Some(address);
            fields.port = cell(port).map(Port::Text);
            collector.fields(at, &fields, options);
            continue;
        }
        for &(index, hint) in &proxy_cells {
            let Some(proxy) = cell(Some(index)) else {
                continue;
            };
            let fields = Fields {
                proxy: Some(proxy),
                protocol_hint: hint,
                ..fields.clone()
            };
            collector.fields(at, &fields, options);
        }
    }
    collector.finish(lines)
}

#[cfg(test)]
mod tests {
    use super::super::parse_list;
    use super::super::testing::{assert_parsed, key, with_credentials, PUBLIC};
    use super::*;

    #[test]
    fn a_header_names_the_address_port_and_protocol_columns() {
        let text = "\"IP Address\",Port,Country,Protocol,Https\n\
            1.2.3.4,8080,\"United States, CA\",HTTP,yes\n\
            5.6.7.8,1080,DE,socks5,no\n\
            \n\
            # a comment\n\
            9.9.9.9,3128,FR,,no\n\
            10.0.0.1,80,US,http,no\n\
            2.2.2.2,99999,US,http,no\n\
            IP Address,Port,Country,Protocol,Https\n";
        assert_parsed(
            text,
            ListFormat::Csv,
            vec![
                key(Protocol::Http, "1.2.3.4", 8080),
                key(Protocol::Socks5, "5.6.7.8", 1080),
                key(Protocol::Http, "9.9.9.9", 3128),
            ],
            9,
            &[
                "line 7 rejected (not_public): http://10.0.0.1:80",
                "line 8 rejected (invalid_port): http://2.2.2.2:99999",
                // A repeated header is a rejected row.
                "line 9 rejected (unknown_scheme): Protocol://IP Address:Port",
            ],
        );
    }

    #[test]
    fn every_proxy_cell_of_a_row_is_read_with_its_columns_protocol() {
        let text = "http,https,socks4,socks5\n\
            1.2.3.4:80,1.2.3.4:443,1.2.3.4:1080,1.2.3.5:1080\n\
            5.6.7.8:8080,,,socks5://5.6.7.9:9050\n\
            9.9.9.9:80\n";
        let parsed = parse_list(text, &PUBLIC);
        assert_eq!(
            parsed.proxies,
            vec![
                key(Protocol::Http, "1.2.3.4", 80),
                key(Protocol::Https, "1.2.3.4", 443),
                key(Protocol::Socks4, "1.2.3.4", 1080),
                key(Protocol::Socks5, "1.2.3.5", 1080),
                key(Protocol::Http, "5.6.7.8", 8080),
                key(Protocol::Socks5, "5.6.7.9", 9050),
                key(Protocol::Http, "9.9.9.9", 80),
            ]
        );
        assert_eq!((parsed.lines, parsed.rejected), (4, 0));
    }

    #[test]
    fn tsv_and_proxy_columns_with_credentials() {
        let text = "proxy\tprotocol\tusername\tpassword\n\
            1.2.3.4:8080\tsocks5\tuser\tse,cret\n\
            http://5.6.7.8:80\tsocks4\t\t\n\
            9.9.9.9:80\t\t\tp\n";
        let parsed = parse_list(text, &PUBLIC);
        assert_eq!(
            parsed.proxies,
            vec![
                with_credentials(
                    key(Protocol::Socks5, "1.2.3.4", 8080),
                    "user",
                    Some("se,cret")
                ),
                key(Protocol::Http, "5.6.7.8", 80)
            ]
        );
        assert_eq!(parsed.rejected, 1);
        assert_eq!(parsed.first_rejects[0].at, Position::Line(4));
        assert_eq!(parsed.first_rejects[0].text, "9.9.9.9:80");
    }

    #[test]
    fn a_data_line_is_no_header() {
        assert!(find_header("1.2.3.4,8080,US\n").is_none());
        assert!(find_header("ip\n1.2.3.4\n").is_none());
        assert!(find_header("country,speed\n").is_none());
        assert!(find_header("ip,1.2.3.4\n").is_none());
        let header = find_header("\n# list\nip;port\n1.2.3.4;80\n").expect("a header");
        assert_eq!((header.line, header.delimiter), (3, b';'));
    }
}
