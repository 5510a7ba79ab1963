//! SOCKS on both sides of the gateway: the SOCKS5 server handshake a client
//! opens a tunnel with (RFC 1928, CONNECT, username/password of RFC 1929),
//! and the SOCKS4a / SOCKS5 client handshakes that open a tunnel through a
//! socks pool proxy with the list's credentials.

use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::target::Target;

/// Replies of RFC 1928 section 6.
pub const REPLY_OK: u8 = 0x00;
pub const REPLY_GENERAL_FAILURE: u8 = 0x01;
pub const REPLY_NOT_ALLOWED: u8 = 0x02;
pub const REPLY_HOST_UNREACHABLE: u8 = 0x04;
pub const REPLY_COMMAND_NOT_SUPPORTED: u8 = 0x07;
pub const REPLY_ADDRESS_NOT_SUPPORTED: u8 = 0x08;

/// What a SOCKS5 client sent before its request was answered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Socks5Request {
    pub username: Option<String>,
    pub password: Option<String>,
    pub target: Target,
}

/// Why a SOCKS5 client's handshake went no further.
#[derive(Debug, thiserror::Error)]
pub enum SocksServerError {
    #[error("not SOCKS5: {0}")]
    Protocol(&'static str),
    /// The reply was sent already.
    #[error("request refused: {0}")]
    Refused(&'static str),
    #[error("{0}")]
    Io(#[from] io::Error),
}

/// Runs the server side up to the request. With `require_auth` only the
/// username/password method is accepted; otherwise it is still preferred
/// (it names the source). The password is returned for the caller to check;
/// `auth_ok` answers the RFC 1929 sub-negotiation.
pub fn server_handshake<S: Read + Write>(
    stream: &mut S,
    require_auth: bool,
    auth_ok: impl Fn(Option<&str>) -> bool,
) -> Result<Socks5Request, SocksServerError> {
    let mut greeting = [0u8; 2];
    stream.read_exact(&mut greeting)?;
    if greeting[0] != 5 {
        return Err(SocksServerError::Protocol("version is not 5"));
    }
    let mut methods = vec![0u8; usize::from(greeting[1])];
    stream.read_exact(&mut methods)?;
    let (mut username, mut password) = (None, None);
    if methods.contains(&0x02) {
        stream.write_all(&[5, 0x02])?;
        let mut version = [0u8; 2];
        stream.read_exact(&mut version)?;
        if version[0] != 1 {
            return Err(SocksServerError::Protocol("auth version is not 1"));
        }
        let user = read_string(stream, usize::from(version[1]))?;
        let mut len = [0u8; 1];
        stream.read_exact(&mut len)?;
        let pass = read_string(stream, usize::from(len[0]))?;
        if !auth_ok(Some(&pass)) {
            stream.write_all(&[1, 1])?;
            return Err(SocksServerError::Refused("wrong password"));
        }
        stream.write_all(&[1, 0])?;
        username = Some(user).filter(|u| !u.is_empty());
        password = Some(pass);
    } else if methods.contains(&0x00) && !require_auth && auth_ok(None) {
        stream.write_all(&[5, 0x00])?;
    } else {
        stream.write_all(&[5, 0xff])?;
        return Err(SocksServerError::Refused(
            "no acceptable authentication method",
        ));
    }
    let mut request = [0u8; 4];
    stream.read_exact(&mut request)?;
    if request[0] != 5 {
        return Err(SocksServerError::Protocol("request version is not 5"));
    }
    if request[1] != 1 {
        reply(stream, REPLY_COMMAND_NOT_SUPPORTED)?;
        return Err(SocksServerError::Refused("only CONNECT is supported"));
    }
    let host = match request[3] {
        1 => {
            let mut ip = [0u8; 4];
            stream.read_exact(&mut ip)?;
            IpAddr::V4(Ipv4Addr::from(ip)).to_string()
        }
        3 => {
            let mut len = [0u8; 1];
            stream.read_exact(&mut len)?;
            read_string(stream, usize::from(len[0]))?
        }
        4 => {
            let mut ip = [0u8; 16];
            stream.read_exact(&mut ip)?;
            IpAddr::V6(Ipv6Addr::from(ip)).to_string()
        }
        _ => {
            reply(stream, REPLY_ADDRESS_NOT_SUPPORTED)?;
            return Err(SocksServerError::Refused("unknown address type"));
        }
    };
    let mut port = [0u8; 2];
    stream.read_exact(&mut port)?;
    let port = u16::from_be_bytes(port);
    let Some(target) = Target::new(&host, port) else {
        reply(stream, REPLY_ADDRESS_NOT_SUPPORTED)?;
        return Err(SocksServerError::Refused("bad target address"));
    };
    Ok(Socks5Request {
        username,
        password,
        target,
    })
}

/// A reply to a request, with an unspecified bound address.
pub fn reply<S: Write>(stream: &mut S, code: u8) -> io::Result<()> {
    stream.write_all(&[5, code, 0, 1, 0, 0, 0, 0, 0, 0])
}

fn read_string<S: Read>(stream: &mut S, len: usize) -> io::Result<String> {
    let mut bytes = vec![0u8; len];
    stream.read_exact(&mut bytes)?;
    String::from_utf8(bytes).map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "not utf-8"))
}

/// Why a socks pool proxy did not open the tunnel.
#[derive(Debug, thiserror::Error)]
pub enum SocksClientError {
    #[error("socks proxy refused: {0}")]
    Refused(String),
    #[error("socks proxy answered something else: {0}")]
    Protocol(&'static str),
    #[error("{0}")]
    Io(#[from] io::Error),
}

/// Opens a tunnel to `target` through a SOCKS5 proxy on `stream`.
pub fn socks5_connect<S: Read + Write>(
    stream: &mut S,
    target: &Target,
    credentials: Option<(&str, &str)>,
) -> Result<(), SocksClientError> {
    let greeting: &[u8] = if credentials.is_some() {
        &[5, 2, 0x00, 0x02]
    } else {
        &[5, 1, 0x00]
    };
    stream.write_all(greeting)?;
    let mut chosen = [0u8; 2];
    stream.read_exact(&mut chosen)?;
    if chosen[0] != 5 {
        return Err(SocksClientError::Protocol("not a SOCKS5 greeting reply"));
    }
    match (chosen[1], credentials) {
        (0x00, _) => {}
        (0x02, Some((user, pass))) => {
            let (user, pass) = (user.as_bytes(), pass.as_bytes());
            if user.len() > 255 || pass.len() > 255 {
                return Err(SocksClientError::Refused("credentials too long".into()));
            }
            let mut auth = vec![1, user.len() as u8];
            auth.extend_from_slice(user);
            auth.push(pass.len() as u8);
            auth.extend_from_slice(pass);
            stream.write_all(&auth)?;
            let mut status = [0u8; 2];
            stream.read_exact(&mut status)?;
            if status[1] != 0 {
                return Err(SocksClientError::Refused("authentication failed".into()));
            }
        }
        _ => {
            return Err(SocksClientError::Refused(
                "no acceptable authentication method".into(),
            ))
        }
    }
    let mut request = vec![5, 1, 0];
    match target.ip() {
        Some(IpAddr::V4(ip)) => {
            request.push(1);
            request.extend_from_slice(&ip.octets());
        }
        Some(IpAddr::V6(ip)) => {
            request.push(4);
            request.extend_from_slice(&ip.octets());
        }
        None => {
            request.push(3);
            request.push(target.host.len() as u8);
            request.extend_from_slice(target.host.as_bytes());
        }
    }
    request.extend_from_slice(&target.port.to_be_bytes());
    stream.write_all(&request)?;
    let mut answer = [0u8; 4];
    stream.read_exact(&mut answer)?;
    if answer[0] != 5 {
        return Err(SocksClientError::Protocol("not a SOCKS5 reply"));
    }
    if answer[1] != REPLY_OK {
        return Err(SocksClientError::Refused(format!("reply {}", answer[1])));
    }
    let bound_len = match answer[3] {
        1 => 4,
        4 => 16,
        3 => {
            let mut len = [0u8; 1];
            stream.read_exact(&mut len)?;
            usize::from(len[0])
        }
        _ => return Err(SocksClientError::Protocol("unknown bound address type")),
    };
    let mut bound = vec![0u8; bound_len + 2];
    stream.read_exact(&mut bound)?;
    Ok(())
}

/// Opens a tunnel to `target` through a SOCKS4 proxy on `stream` (SOCKS4a
/// for host names); the user ID is the username when the list gave one.
pub fn socks4_connect<S: Read + Write>(
    stream: &mut S,
    target: &Target,
    username: Option<&str>,
) -> Result<(), SocksClientError> {
    let mut request = vec![4, 1];
    request.extend_from_slice(&target.port.to_be_bytes());
    let name = match target.ip() {
        Some(IpAddr::V4(ip)) => {
            request.extend_from_slice(&ip.octets());
            None
        }
        Some(IpAddr::V6(_)) => {
            return Err(SocksClientError::Refused(
                "socks4 cannot reach an IPv6 address".into(),
            ))
        }
        None => {
            request.extend_from_slice(&[0, 0, 0, 1]);
            Some(&target.host)
        }
    };
    request.extend_from_slice(username.unwrap_or("").as_bytes());
    request.push(0);
    if let Some(name) = name {
        request.extend_from_slice(name.as_bytes());
        request.push(0);
    }
    stream.write_all(&request)?;
    let mut answer = [0u8; 8];
    stream.read_exact(&mut answer)?;
    if answer[1] != 0x5a {
        return Err(SocksClientError::Refused(format!("reply {}", answer[1])));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stream that reads `input` and records what is written.
    struct Script {
        input: io::Cursor<Vec<u8>>,
        output: Vec<u8>,
    }

    impl Script {
        fn new(input: &[u8]) -> Script {
            Script {
                input: io::Cursor::new(input.to_vec()),
                output: Vec::new(),
            }
        }
    }

    impl Read for Script {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.input.read(buf)
        }
    }

    impl Write for Script {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.output.write(buf)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn server_reads_credentials_and_a_domain_target() {
        let mut input = vec![5, 2, 0, 2, 1, 6];
        input.extend_from_slice(b"my_app");
        input.push(3);
        input.extend_from_slice(b"tok");
        input.extend_from_slice(&[5, 1, 0, 3, 8]);
        input.extend_from_slice(b"a.test.x");
        input.extend_from_slice(&443u16.to_be_bytes());
        let mut script = Script::new(&input);
        let request = server_handshake(&mut script, true, |p| p == Some("tok")).unwrap();
        assert_eq!(request.username.as_deref(), Some("my_app"));
        assert_eq!(request.target.host, "a.test.x");
        assert_eq!(request.target.port, 443);
        assert_eq!(script.output, vec![5, 2, 1, 0]);
    }

    #[test]
    fn server_refuses_a_wrong_password_and_no_auth_when_required() {
        let mut input = vec![5, 1, 2, 1, 1, b'u', 1, b'x'];
        input.extend_from_slice(&[5, 1, 0, 1, 127, 0, 0, 1, 0, 80]);
        let mut script = Script::new(&input);
        assert!(matches!(
            server_handshake(&mut script, true, |p| p == Some("tok")),
            Err(SocksServerError::Refused(_))
        ));
        assert_eq!(script.output, vec![5, 2, 1, 1]);
        let mut script = Script::new(&[5, 1, 0]);
        assert!(server_handshake(&mut script, true, |_| true).is_err());
        assert_eq!(script.output, vec![5, 0xff]);
    }

    #[test]
    fn server_refuses_other_commands_and_address_types() {
        let mut script = Script::new(&[5, 1, 0, 5, 2, 0, 1, 1, 2, 3, 4, 0, 80]);
        assert!(server_handshake(&mut script, false, |_| true).is_err());
        assert_eq!(script.output[2..4], [5, REPLY_COMMAND_NOT_SUPPORTED]);
        let mut script = Script::new(&[5, 1, 0, 5, 1, 0, 9]);
        assert!(server_handshake(&mut script, false, |_| true).is_err());
        assert_eq!(script.output[2..4], [5, REPLY_ADDRESS_NOT_SUPPORTED]);
        let mut script = Script::new(&[4, 1, 0, 80]);
        assert!(matches!(
            server_handshake(&mut script, false, |_| true),
            Err(SocksServerError::Protocol(_))
        ));
    }

    #[test]
    fn client_speaks_socks5_with_credentials() {
        let mut script = Script::new(&[5, 2, 1, 0, 5, 0, 0, 1, 0, 0, 0, 0, 0, 0]);
        let target = Target::new("a.test", 80).unwrap();
        socks5_connect(&mut script, &target, Some(("u", "p"))).unwrap();
        let mut expected = vec![5, 2, 0, 2, 1, 1, b'u', 1, b'p', 5, 1, 0, 3, 6];
        expected.extend_from_slice(b"a.test");
        expected.extend_from_slice(&[0, 80]);
        assert_eq!(script.output, expected);
        let mut script = Script::new(&[5, 0, 5, 5, 0, 1, 0, 0, 0, 0, 0, 0]);
        assert!(matches!(
            socks5_connect(&mut script, &target, None),
            Err(SocksClientError::Refused(_))
        ));
    }

    #[test]
    fn client_speaks_socks4a() {
        let mut script = Script::new(&[0, 0x5a, 0, 0, 0, 0, 0, 0]);
        let target = Target::new("a.test", 80).unwrap();
        socks4_connect(&mut script, &target, Some("u")).unwrap();
        let mut expected = vec![4, 1, 0, 80, 0, 0, 0, 1, b'u', 0];
        expected.extend_from_slice(b"a.test\0");
        assert_eq!(script.output, expected);
        let mut script = Script::new(&[0, 0x5b, 0, 0, 0, 0, 0, 0]);
        assert!(socks4_connect(&mut script, &target, None).is_err());
    }
}
