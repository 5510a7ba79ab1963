//! Web pages that list proxies: table rows whose cells hold an address and
//! a port (the free-proxy-list.net layout, with a cell naming the protocol
//! where there is one), and `host:port` text anywhere else in the page.
//!
//! A small tolerant scan rather than an HTML parser: all it needs is where
//! rows and cells begin and end and the text between tags, and such pages
//! leave cells unclosed and nest carelessly. A DOM crate would add a tree
//! builder and its dependencies for nothing more.

use std::borrow::Cow;

use super::fields::{Fields, Port};
use super::text::{parse_line, parse_protocols};
use super::{Collector, ListFormat, ParseOptions, ParsedList, Position};

/// Tags that start a new block: the text before and after them are two words.
/// (Inline tags such as `span` join their text: pages split addresses into
/// spans to defeat scrapers.)
const BLOCK_TAGS: [&str; 7] = ["br", "p", "div", "li", "ul", "ol", "hr"];

pub(super) fn parse(text: &str, options: &ParseOptions) -> ParsedList {
    let mut page = Page {
        collector: Collector::new(ListFormat::Html, text.len() / 256),
        options,
        row: None,
        text,
        counted_to: 0,
        line: 1,
    };
    let bytes = text.as_bytes();
    let mut at = 0;
    while at < bytes.len() {
        let tag_start = find_byte(bytes, at, b'<').unwrap_or(bytes.len());
        if tag_start > at {
            page.text(at, &text[at..tag_start]);
        }
        if tag_start == bytes.len() {
            break;
        }
        if text[tag_start..].starts_with("<!--") {
            at = text[tag_start..]
                .find("-->")
                .map_or(bytes.len(), |end| tag_start + end + 3);
            continue;
        }
        let tag_end = find_byte(bytes, tag_start, b'>').unwrap_or(bytes.len());
        let tag = &text[tag_start + 1..tag_end];
        let closing = tag.starts_with('/');
        let name_start = usize::from(closing);
        let name_end = tag[name_start..]
            .bytes()
            .position(|b| !b.is_ascii_alphanumeric())
            .map_or(tag.len(), |end| name_start + end);
        let name = &tag[name_start..name_end];
        at = (tag_end + 1).min(bytes.len());
        let is = |wanted: &str| name.eq_ignore_ascii_case(wanted);
        if !closing && (is("script") || is("style")) {
            // Their text is no markup: scan it for `host:port`, not for cells.
            let end = find_closing(text, at, name).unwrap_or(bytes.len());
            page.text_outside_cells(at, &text[at..end]);
            at = end;
        } else if is("tr") {
            page.end_row();
            if !closing {
                page.start_row(tag_start);
            }
        } else if is("td") || is("th") {
            page.end_cell();
            if !closing {
                page.start_cell(tag_start);
            }
        } else if is("table") || is("tbody") || is("thead") || is("tfoot") {
            page.end_row();
        } else if BLOCK_TAGS.iter().any(|block| is(block)) {
            page.space();
        }
    }
    page.end_row();
    let lines = text.lines().count();
    page.collector.finish(lines)
}

struct Page<'t, 'o> {
    collector: Collector,
    options: &'o ParseOptions,
    row: Option<Row>,
    text: &'t str,
    /// Lines are counted up to here: `line` is the line of this offset.
    counted_to: usize,
    line: usize,
}

struct Row {
    line: usize,
    cells: Vec<String>,
    /// The cell being read, if one is open.
    cell: Option<String>,
}

impl Page<'_, '_> {
    /// The 1-based line of a byte offset; offsets only grow.
    fn line_at(&mut self, offset: usize) -> usize {
        let offset = offset.max(self.counted_to);
        self.line += self.text.as_bytes()[self.counted_to..offset]
            .iter()
            .filter(|&&b| b == b'\n')
            .count();
        self.counted_to = offset;
        self.line
    }

    fn text(&mut self, offset: usize, raw: &str) {
        match self.row.as_mut().and_then(|row| row.cell.as_mut()) {
            Some(cell) => cell.push_str(&decode_entities(raw)),
            None => self.text_outside_cells(offset, raw),
        }
    }

    fn text_outside_cells(&mut self, offset: usize, raw: &str) {
        let line = self.line_at(offset);
        let decoded = decode_entities(raw);
        scan_host_ports(&decoded, |candidate, newlines_before| {
            let at = Position::Line(line + newlines_before);
            let outcome = parse_line(candidate, self.options);
            self.collector.outcome(at, candidate, outcome);
        });
    }

    fn space(&mut self) {
        if let Some(cell) = self.row.as_mut().and_then(|row| row.cell.as_mut()) {
            cell.push(' ');
        }
    }

    fn start_row(&mut self, offset: usize) {
        let line = self.line_at(offset);
        self.row = Some(Row {
            line,
            cells: Vec::new(),
            cell: None,
        });
    }

    fn start_cell(&mut self, offset: usize) {
        if self.row.is_none() {
            // A cell outside any row: the page left out its `<tr>`.
            self.start_row(offset);
        }
        if let Some(row) = self.row.as_mut() {
            row.cell = Some(String::new());
        }
    }

    fn end_cell(&mut self) {
        if let Some(row) = self.row.as_mut() {
            if let Some(cell) = row.cell.take() {
                row.cells.push(cell);
            }
        }
    }

    /// A row gives the proxy of its first address cell followed by a port
    /// cell, in the protocols a cell of its own names; `host:port` text in
    /// its cells is read as anywhere else.
    fn end_row(&mut self) {
        self.end_cell();
        let Some(row) = self.row.take() else {
            return;
        };
        let at = Position::Line(row.line);
        let cells: Vec<&str> = row.cells.iter().map(|cell| cell.trim()).collect();
        let pair = cells
            .windows(2)
            .position(|pair| looks_like_address(pair[0]) && looks_like_port(pair[1]));
        if let Some(index) = pair {
            let mut fields = Fields {
                address: Some(cells[index]),
                port: Some(Port::Text(cells[index + 1])),
                ..Fields::default()
            };
            let names_protocols = |cell: &&str| {
                let mut protocols = Vec::new();
                parse_protocols(cell, &mut protocols).is_ok() && !protocols.is_empty()
            };
            fields.protocols = cells.iter().copied().filter(names_protocols).collect();
            self.collector.fields(at, &fields, self.options);
        }
        for cell in &cells {
            scan_host_ports(cell, |candidate, _| {
                let outcome = parse_line(candidate, self.options);
                self.collector.outcome(at, candidate, outcome);
            });
        }
    }
}

/// A cell that is an address, or tries to be one (`999.1.1.1` is refused,
/// not passed over).
fn looks_like_address(cell: &str) -> bool {
    let dotted_quad = cell.split('.').count() == 4
        && cell
            .split('.')
            .all(|part| (1..=3).contains(&part.len()) && part.bytes().all(|b| b.is_ascii_digit()));
    dotted_quad || (cell.contains(':') && cell.parse::<std::net::Ipv6Addr>().is_ok())
}

fn looks_like_port(cell: &str) -> bool {
    (1..=5).contains(&cell.len()) && cell.bytes().all(|b| b.is_ascii_digit())
}

/// Calls `found` with every `ip:port` (optionally `scheme://ip:port`) in
/// `text` and the newlines before it; what follows the port is not part of it.
fn scan_host_ports(text: &str, mut found: impl FnMut(&str, usize)) {
    let bytes = text.as_bytes();
    let mut at = 0;
    let mut newlines = 0;
    let mut counted_to = 0;
    while at < bytes.len() {
        let starts_number = bytes[at].is_ascii_digit()
            && (at == 0 || !(bytes[at - 1].is_ascii_alphanumeric() || bytes[at - 1] == b'.'));
        if !starts_number {
            at += 1;
            continue;
        }
        let Some(end) = host_port_end(bytes, at) else {
            at += bytes[at..]
                .iter()
                .position(|b| !b.is_ascii_digit())
                .unwrap_or(bytes.len() - at);
            continue;
        };
        let scheme_start = text[..at].strip_suffix("://").map(|before| {
            before
                .bytes()
                .rposition(|b| !b.is_ascii_alphanumeric())
                .map_or(0, |at| at + 1)
        });
        let start = scheme_start.unwrap_or(at);
        newlines += bytes[counted_to..start]
            .iter()
            .filter(|&&b| b == b'\n')
            .count();
        counted_to = start;
        found(&text[start..end], newlines);
        at = end;
    }
}

/// The end of `d.d.d.d:port` starting at `at` (each part of 1 to 3 digits,
/// the port of 1 to 5 and not followed by another digit).
fn host_port_end(bytes: &[u8], at: usize) -> Option<usize> {
    let digits = |from: usize, most: usize| {
        let run = bytes[from..]
            .iter()
            .take(most + 1)
            .take_while(|b| b.is_ascii_digit())
            .count();
        (1..=most).contains(&run).then_some(from + run)
    };
    let mut end = at;
    for part in 0..4 {
        end = digits(end, 3)?;
        let separator = if part < 3 { b'.' } else { b':' };
        if bytes.get(end) != Some(&separator) {
            return None;
        }
        end += 1;
    }
    digits(end, 5)
}

fn find_byte(bytes: &[u8], from: usize, byte: u8) -> Option<usize> {
    bytes[from..]
        .iter()
        .position(|&b| b == byte)
        .map(|at| from + at)
}

/// Where `</name` is, case aside, from `from` on.
fn find_closing(text: &str, from: usize, name: &str) -> Option<usize> {
    let bytes = text.as_bytes();
    let mut at = from;
    while let Some(start) = find_byte(bytes, at, b'<') {
        let candidate = &bytes[start + 1..];
        if candidate.first() == Some(&b'/')
            && candidate.len() > name.len()
            && candidate[1..=name.len()].eq_ignore_ascii_case(name.as_bytes())
        {
            return Some(start);
        }
        at = start + 1;
    }
    None
}

/// Replaces the entities a proxy list uses (`&nbsp;`, `&amp;`, `&#58;`...).
fn decode_entities(text: &str) -> Cow<'_, str> {
    if !text.contains('&') {
        return Cow::Borrowed(text);
    }
    let mut decoded = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find('&') {
        decoded.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        let entity = after
            .find(';')
            .filter(|&end| end <= 10)
            .and_then(|end| entity(&after[..end]).map(|c| (c, end)));
        match entity {
            Some((c, end)) => {
                decoded.push(c);
                rest = &after[end + 1..];
            }
            None => {
                decoded.push('&');
                rest = after;
            }
        }
    }
    decoded.push_str(rest);
    Cow::Owned(decoded)
}

fn entity(name: &str) -> Option<char> {
    let code = match name {
        "nbsp" => return Some(' '),
        "amp" => return Some('&'),
        "lt" => return Some('<'),
        "gt" => return Some('>'),
        "quot" => return Some('"'),
        "apos" => return Some('\''),
        _ => match name.strip_prefix('#') {
            Some(hex) if hex.starts_with(['x', 'X']) => u32::from_str_radix(&hex[1..], 16).ok()?,
            Some(decimal) => decimal.parse().ok()?,
            None => return None,
        },
    };
    char::from_u32(code)
}

#[cfg(test)]
mod tests {
    use super::super::parse_list;
    use super::super::testing::{assert_parsed, key, PUBLIC};
    use super::*;
    use crate::proxy::Protocol;

    #[test]
    fn table_rows_give_their_address_and_port_cells() {
        // The free-proxy-list.net layout, and socks-proxy.net's Version column.
        let page = "<!DOCTYPE html>\n<html><body>\n<table class=\"table\">\n\
            <thead><tr><th>IP Address</th><th>Port</th><th>Code</th><th>Https</th></tr></thead>\n\
            <tbody>\n\
            <tr><td>1.2.3.4</td><td>8080</td><td>US</td><td class='hx'>yes</td></tr>\n\
            <tr><td>5.6.7.8<td>1080<td>DE<td>Socks5\n\
            <tr><TD> 9.9.9.9 </TD><td>&nbsp;3128</td><td>HTTP, HTTPS</td></tr>\n\
            <tr><td>10.0.0.1</td><td>80</td></tr>\n\
            <tr><td>2.2.2.2</td><td>0</td></tr>\n\
            <tr><td>1.<span>3</span>.3.3</td><td>81</td></tr>\n\
            </tbody></table></body></html>\n";
        assert_parsed(
            page,
            ListFormat::Html,
            vec![
                key(Protocol::Http, "1.2.3.4", 8080),
                key(Protocol::Socks5, "5.6.7.8", 1080),
                key(Protocol::Http, "9.9.9.9", 3128),
                key(Protocol::Https, "9.9.9.9", 3128),
                key(Protocol::Http, "1.3.3.3", 81),
            ],
            12,
            &[
                "line 9 rejected (not_public): 10.0.0.1:80",
                "line 10 rejected (invalid_port): 2.2.2.2:0",
            ],
        );
    }

    #[test]
    fn host_port_text_anywhere_in_the_page_is_read() {
        let page = "<html><head><script>var list = ['1.2.3.4:80', \"socks5://5.6.7.8:1080\"];\
            if (a<b) {}</script><style>p{margin:1.2.3.4}</style></head>\n\
            <body><!-- 7.7.7.7:80 is commented out -->\n\
            <pre>\n9.9.9.9:3128 US\n\n  2.2.2.2&#58;8080 elite\n999.1.1.1:80\n</pre>\n\
            <p>Version 1.2.3.4.5:99 is no proxy; updated 12:30, v1.2.3:4</p>\n\
            <td>3.3.3.3:8000</td></body></html>";
        let parsed = parse_list(page, &PUBLIC);
        assert_eq!(
            parsed.proxies,
            vec![
                key(Protocol::Http, "1.2.3.4", 80),
                key(Protocol::Socks5, "5.6.7.8", 1080),
                key(Protocol::Http, "9.9.9.9", 3128),
                key(Protocol::Http, "2.2.2.2", 8080),
                key(Protocol::Http, "3.3.3.3", 8000),
            ]
        );
        assert_eq!(parsed.rejected, 1);
        assert_eq!(parsed.first_rejects[0].at, Position::Line(7));
        assert_eq!(parsed.first_rejects[0].text, "999.1.1.1:80");
    }

    #[test]
    fn a_page_without_proxies_is_no_list() {
        let parsed = parse_list(
            "<html><body><p>Please enable JavaScript. 12:30</p></body></html>\n",
            &PUBLIC,
        );
        assert_eq!(
            (parsed.proxies.len(), parsed.rejected, parsed.lines),
            (0, 0, 1)
        );
        assert_eq!(
            parsed.not_a_list(),
            Some("not a proxy list: the body is an HTML page")
        );
    }

    #[test]
    fn entities_are_decoded() {
        assert_eq!(
            decode_entities("a&nbsp;b&amp;c&#58;&#x3A;&bogus;&"),
            "a b&c::&bogus;&"
        );
    }
}
