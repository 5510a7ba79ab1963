//! Real proxy software for the tests of tests/real_proxies.rs: Debian's
//! squid, tinyproxy, dante (danted) and microsocks, each started as a
//! process of its own with a config written here, listening on its own
//! loopback address and connecting out from it, with its pid and log files
//! in a temporary directory; real httpbin under gunicorn; a small
//! TLS-intercepting proxy; and the validator driven as a user drives it
//! (`proxy-pool import`, then `proxy-pool validate`).
//!
//! Every process is killed when its guard drops. The system services of the
//! packages are never used.

use std::io::{self, Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use proxy_farm::{Farm, FarmSpec, ServerCert, TestCa, TlsJudge};

use super::{is_root_on_debian, under_ci, TestDb};

/// How long a started program may take to listen.
const START_LIMIT: Duration = Duration::from_secs(30);

/// A program the tests need, and the Debian package that has it.
pub struct Tool {
    pub binary: &'static str,
    pub package: &'static str,
}

pub const SQUID: Tool = Tool {
    binary: "squid",
    package: "squid",
};
pub const TINYPROXY: Tool = Tool {
    binary: "tinyproxy",
    package: "tinyproxy",
};
pub const DANTED: Tool = Tool {
    binary: "danted",
    package: "dante-server",
};
pub const MICROSOCKS: Tool = Tool {
    binary: "microsocks",
    package: "microsocks",
};

/// The path of `binary` in PATH or the sbin folders (not in a non-root PATH).
pub fn find_binary(binary: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/bin", "/sbin", "/usr/local/sbin"].map(PathBuf::from))
        .map(|dir| dir.join(binary))
        .find(|candidate| candidate.is_file())
}

/// Makes every tool of `tools` available: when one is missing and this is
/// root on Debian, scripts/install-test-deps.sh installs the missing
/// packages once per test process (under a file lock: parallel test
/// processes take turns). `Err` says why a tool is still missing; under
/// `CI` that is a panic instead (no skipping there). Not being root is such
/// a reason too.
pub fn require(tools: &[&Tool]) -> Result<Vec<PathBuf>, String> {
    static INSTALL: OnceLock<Result<(), String>> = OnceLock::new();
    if !super::running_as_root() {
        let why = "needs root: the https judge listens on port 443, where stock squid and \
                   tinyproxy tunnel, and squid and danted drop privileges from root";
        if under_ci() {
            panic!("{why} (CI is set: no skipping)");
        }
        return Err(why.to_owned());
    }
    let missing = |tools: &[&Tool]| -> Vec<&'static str> {
        tools
            .iter()
            .filter(|tool| find_binary(tool.binary).is_none())
            .map(|tool| tool.package)
            .collect()
    };
    if !missing(tools).is_empty() {
        let installed = INSTALL.get_or_init(|| {
            if !is_root_on_debian() {
                return Err("not root on Debian, so not installed here".to_owned());
            }
            install_test_deps()
        });
        let still = missing(tools);
        if !still.is_empty() {
            let why = format!(
                "{} not installed ({}); run scripts/install-test-deps.sh as root \
                 (apt-get install {})",
                still.join(", "),
                installed
                    .as_ref()
                    .err()
                    .map_or("install ran", String::as_str),
                still.join(" ")
            );
            if under_ci() {
                panic!("{why} (CI is set: no skipping)");
            }
            return Err(why);
        }
    }
    Ok(tools
        .iter()
        .map(|tool| find_binary(tool.binary).expect("found above"))
        .collect())
}

fn install_test_deps() -> Result<(), String> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/install-test-deps.sh");
    let output = Command::new("flock")
        .args(["-w", "900", "/tmp/proxy-pool-install-test-deps.lock"])
        .arg(&script)
        .stdin(Stdio::null())
        .output()
        .map_err(|err| format!("cannot run {}: {err}", script.display()))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{} failed ({}): {}",
            script.display(),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        ))
    }
}

/// The address `127.77.NET.HOST`: each test uses a `NET` of its own, so
/// tests in parallel processes never share an address.
pub fn address(net: u8, host: u8) -> IpAddr {
    IpAddr::from([127, 77, net, host])
}

/// The judges of one test: the farm's plain judge (the product's judge echo,
/// origin = the TCP peer) on `127.77.NET.3`, the same judge over https on
/// `127.77.NET.1:443` with a certificate of a throwaway CA, and that CA's
/// PEM in `dir`.
pub struct Judges {
    pub farm: Farm,
    pub tls: TlsJudge,
    pub ca_file: PathBuf,
    pub dir: tempfile::TempDir,
}

impl Judges {
    pub fn start(net: u8) -> Judges {
        let farm = Farm::start(FarmSpec::new().listen(SocketAddr::new(address(net, 3), 0)))
            .expect("start the plain judge");
        let ca = TestCa::new("real proxies test CA").expect("a CA");
        let tls_ip = address(net, 1);
        let cert = ca.server_cert(&[tls_ip]).expect("a judge certificate");
        // Port 443: stock squid and tinyproxy tunnel there only.
        let tls = TlsJudge::start(SocketAddr::new(tls_ip, 443), &cert)
            .expect("the https judge on port 443 (needs root or CAP_NET_BIND_SERVICE)");
        let dir = tempfile::tempdir().expect("tempdir");
        let ca_file = dir.path().join("judge-ca.pem");
        ca.write_pem(&ca_file).expect("write the CA");
        Judges {
            farm,
            tls,
            ca_file,
            dir,
        }
    }

    /// The plain judge with `show_env=1`, as the shipped config names httpbin.
    pub fn validation_target(&self) -> String {
        format!("{}?show_env=1", self.farm.judge_url())
    }

    /// The https judge: `https://127.77.NET.1/get?show_env=1` (port 443 implied).
    pub fn https_target(&self) -> String {
        format!("https://{}/get?show_env=1", self.tls.address().ip())
    }
}

/// A started program, killed (and its leftovers removed) on drop.
pub struct Process {
    pub name: String,
    child: Child,
    pub dir: tempfile::TempDir,
    log: PathBuf,
    /// Files to remove after the kill (squid's shared memory segments).
    leftovers: Vec<PathBuf>,
}

impl Process {
    /// Runs `command` with its output in `dir/NAME.out`, then waits until
    /// `listen` accepts connections (or the program exits: a panic with
    /// its log).
    fn start(
        name: &str,
        mut command: Command,
        dir: tempfile::TempDir,
        log: PathBuf,
        listen: SocketAddr,
    ) -> Process {
        let out_path = dir.path().join(format!("{name}.out"));
        let out = std::fs::File::create(&out_path).expect("output file");
        let child = command
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("dup"))
            .stderr(out)
            .spawn()
            .unwrap_or_else(|err| panic!("cannot start {name}: {err}"));
        let mut process = Process {
            name: name.to_owned(),
            child,
            dir,
            log,
            leftovers: Vec::new(),
        };
        let deadline = Instant::now() + START_LIMIT;
        loop {
            if TcpStream::connect_timeout(&listen, Duration::from_millis(200)).is_ok() {
                return process;
            }
            if let Ok(Some(status)) = process.child.try_wait() {
                panic!(
                    "{name} exited ({status}) before listening on {listen}:\n{}",
                    process.logs()
                );
            }
            if Instant::now() > deadline {
                panic!(
                    "{name} did not listen on {listen} within {START_LIMIT:?}:\n{}",
                    process.logs()
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Its output and its log file, for a failure message.
    pub fn logs(&self) -> String {
        let out = self.dir.path().join(format!("{}.out", self.name));
        let read = |path: &Path| std::fs::read_to_string(path).unwrap_or_default();
        format!(
            "--- {} output ---\n{}\n--- {} ---\n{}",
            self.name,
            read(&out),
            self.log.display(),
            read(&self.log)
        )
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        for path in &self.leftovers {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// A temporary directory anyone may write in: squid and tinyproxy drop
/// root for an unprivileged user that writes its logs there.
fn open_dir() -> tempfile::TempDir {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777))
        .expect("chmod the proxy's folder");
    dir
}

pub const SQUID_PORT: u16 = 3128;

/// squid on `ip:3128`, connecting out from `ip`, with the stock access rules
/// (`deny !Safe_ports`, `deny CONNECT !SSL_ports`: tunnels to 443 only) and
/// then `lines` (forwarded_for, via, http_access ...) before `http_access
/// allow all`.
pub fn squid(binary: &Path, ip: IpAddr, lines: &str) -> Process {
    squid_with_files(binary, ip, lines, &[])
}

/// [`squid`] with `files` (name, content) written to its folder first;
/// `{dir}` in `lines` names that folder.
pub fn squid_with_files(binary: &Path, ip: IpAddr, lines: &str, files: &[(&str, &str)]) -> Process {
    let dir = open_dir();
    for (name, content) in files {
        std::fs::write(dir.path().join(name), content).expect("write a squid file");
    }
    let d = dir.path().display();
    let lines = lines.replace("{dir}", &d.to_string());
    // squid takes an alphanumeric service name; it names the shared memory
    // segments, so each instance needs its own.
    let service = match ip {
        IpAddr::V4(v4) => format!("pp{}", u32::from(v4)),
        IpAddr::V6(v6) => format!("pp{}", u128::from(v6)),
    };
    let config = format!(
        "http_port {ip}:{SQUID_PORT}\n\
         tcp_outgoing_address {ip}\n\
         visible_hostname squid-{service}\n\
         cache_effective_user proxy\n\
         pid_filename {d}/squid.pid\n\
         cache_log {d}/cache.log\n\
         access_log stdio:{d}/access.log\n\
         cache_store_log none\n\
         netdb_filename none\n\
         pinger_enable off\n\
         coredump_dir {d}\n\
         cache deny all\n\
         shutdown_lifetime 0 seconds\n\
         acl SSL_ports port 443\n\
         acl Safe_ports port 80 443 1025-65535\n\
         acl CONNECT method CONNECT\n\
         http_access deny !Safe_ports\n\
         http_access deny CONNECT !SSL_ports\n\
         {lines}\n\
         http_access allow all\n"
    );
    let path = dir.path().join("squid.conf");
    std::fs::write(&path, config).expect("write squid.conf");
    let mut command = Command::new(binary);
    command.args(["-N", "-n", &service, "-f"]).arg(&path);
    let log = dir.path().join("cache.log");
    let mut process = Process::start("squid", command, dir, log, SocketAddr::new(ip, SQUID_PORT));
    for segment in ["cf__metadata", "cf__queues", "cf__readers"] {
        process
            .leftovers
            .push(PathBuf::from(format!("/dev/shm/{service}-{segment}.shm")));
    }
    process
}

pub const TINYPROXY_PORT: u16 = 8888;

/// tinyproxy on `ip:8888`, connecting out from `ip`, then `lines`
/// (ConnectPort, DisableViaHeader, BasicAuth ...).
pub fn tinyproxy(binary: &Path, ip: IpAddr, lines: &str) -> Process {
    let dir = open_dir();
    let d = dir.path().display();
    let config = format!(
        "User nobody\n\
         Group nogroup\n\
         Port {TINYPROXY_PORT}\n\
         Listen {ip}\n\
         Bind {ip}\n\
         Timeout 30\n\
         PidFile \"{d}/tinyproxy.pid\"\n\
         LogFile \"{d}/tinyproxy.log\"\n\
         LogLevel Info\n\
         MaxClients 20\n\
         {lines}\n"
    );
    let path = dir.path().join("tinyproxy.conf");
    std::fs::write(&path, config).expect("write tinyproxy.conf");
    let mut command = Command::new(binary);
    command.args(["-d", "-c"]).arg(&path);
    let log = dir.path().join("tinyproxy.log");
    Process::start(
        "tinyproxy",
        command,
        dir,
        log,
        SocketAddr::new(ip, TINYPROXY_PORT),
    )
}

pub const SOCKS_PORT: u16 = 1080;

/// dante's danted on `ip:1080`, socks4 and socks5 without authentication,
/// connecting out from `ip`.
pub fn danted(binary: &Path, ip: IpAddr) -> Process {
    let dir = open_dir();
    let d = dir.path().display();
    let config = format!(
        "logoutput: {d}/danted.log\n\
         internal: {ip} port = {SOCKS_PORT}\n\
         external: {ip}\n\
         clientmethod: none\n\
         socksmethod: none\n\
         user.privileged: root\n\
         user.unprivileged: nobody\n\
         client pass {{\n  from: 0.0.0.0/0 to: 0.0.0.0/0\n}}\n\
         socks pass {{\n  from: 0.0.0.0/0 to: 0.0.0.0/0\n}}\n"
    );
    let path = dir.path().join("danted.conf");
    std::fs::write(&path, config).expect("write danted.conf");
    let mut command = Command::new(binary);
    command
        .arg("-f")
        .arg(&path)
        .arg("-p")
        .arg(dir.path().join("danted.pid"));
    let log = dir.path().join("danted.log");
    Process::start("danted", command, dir, log, SocketAddr::new(ip, SOCKS_PORT))
}

/// microsocks on `ip:1080`, connecting out from `ip`, with `-u USER -P
/// PASSWORD` when `auth` is given.
pub fn microsocks(binary: &Path, ip: IpAddr, auth: Option<(&str, &str)>) -> Process {
    let dir = open_dir();
    let mut command = Command::new(binary);
    command.args([
        "-i",
        &ip.to_string(),
        "-p",
        &SOCKS_PORT.to_string(),
        "-b",
        &ip.to_string(),
    ]);
    if let Some((user, password)) = auth {
        command.args(["-u", user, "-P", password]);
    }
    let log = dir.path().join("microsocks.out");
    Process::start(
        "microsocks",
        command,
        dir,
        log,
        SocketAddr::new(ip, SOCKS_PORT),
    )
}

/// Real httpbin (from PyPI) under gunicorn on `ip:PORT`; `Err` says why it
/// cannot run (python3 or the packages missing and not installable).
pub fn httpbin(ip: IpAddr, port: u16) -> Result<Process, String> {
    let import = "import httpbin, gunicorn";
    let importable = || {
        Command::new("python3")
            .args(["-c", import])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if !importable() {
        let mut tried = Vec::new();
        for extra in ["", "--break-system-packages"] {
            let script = format!("python3 -m pip install --quiet {extra} httpbin gunicorn");
            eprintln!("real proxies: {script}");
            let output = Command::new("flock")
                .args(["-w", "900", "/tmp/proxy-pool-recipes-install.lock"])
                .args(["timeout", "600", "sh", "-c", &script])
                .stdin(Stdio::null())
                .output();
            match output {
                Ok(_) if importable() => break,
                Ok(output) => tried.push(format!(
                    "{script}: {}",
                    String::from_utf8_lossy(&output.stderr).trim()
                )),
                Err(err) => tried.push(format!("{script}: {err}")),
            }
        }
        if !importable() {
            return Err(format!(
                "python3 cannot `{import}` and pip could not install them:\n  {}",
                tried.join("\n  ")
            ));
        }
    }
    let dir = open_dir();
    let mut command = Command::new("python3");
    command
        .args(["-m", "gunicorn", "--workers", "2", "--bind"])
        .arg(format!("{ip}:{port}"))
        .arg("--control-socket")
        .arg(dir.path().join("gunicorn.ctl"))
        .arg("--pid")
        .arg(dir.path().join("gunicorn.pid"))
        .arg("httpbin:app");
    let log = dir.path().join("gunicorn.out");
    Ok(Process::start(
        "gunicorn",
        command,
        dir,
        log,
        SocketAddr::new(ip, port),
    ))
}

/// A TLS-intercepting http proxy on `ip:port`: an absolute-URI request is
/// relayed to its host (connecting out from `ip`, adding no header), and a
/// CONNECT is answered 200 and then served as the judge by itself, with
/// [`ServerCert::interceptor`]'s certificate: the client sees a certificate
/// its roots do not vouch for, as behind every proxy that reads its
/// clients' TLS.
pub struct Interceptor {
    address: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Interceptor {
    pub fn start(ip: IpAddr, port: u16) -> Interceptor {
        let listener = TcpListener::bind((ip, port)).expect("bind the interceptor");
        let address = listener.local_addr().expect("address");
        let cert = ServerCert::interceptor(&[]).expect("an interceptor certificate");
        let config = cert.server_config().expect("a TLS config");
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = Arc::clone(&stop);
        let thread = thread::spawn(move || loop {
            let accepted = listener.accept();
            if stopped.load(Ordering::Relaxed) {
                return;
            }
            if let Ok((stream, peer)) = accepted {
                let config = Arc::clone(&config);
                thread::spawn(move || {
                    if let Err(err) = intercept(stream, peer, ip, config) {
                        eprintln!("interceptor: {peer}: {err}");
                    }
                });
            }
        });
        Interceptor {
            address,
            stop,
            thread: Some(thread),
        }
    }

    pub fn address(&self) -> SocketAddr {
        self.address
    }
}

impl Drop for Interceptor {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect_timeout(&self.address, Duration::from_millis(200));
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn intercept(
    mut client: TcpStream,
    peer: SocketAddr,
    ip: IpAddr,
    config: Arc<rustls::ServerConfig>,
) -> io::Result<()> {
    client.set_read_timeout(Some(Duration::from_secs(10)))?;
    let Some(head) = proxy_farm::tls::read_request_head(&mut client)? else {
        return Ok(());
    };
    if head.method == "CONNECT" {
        client.write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")?;
        proxy_farm::tls::serve_judge_tls(client, peer, config)?;
        return Ok(());
    }
    let Some(rest_of_uri) = head.target.strip_prefix("http://") else {
        client.write_all(b"HTTP/1.1 400 Bad Request\r\nConnection: close\r\n\r\n")?;
        return Ok(());
    };
    let (authority, path) = match rest_of_uri.find('/') {
        Some(i) => (&rest_of_uri[..i], &rest_of_uri[i..]),
        None => (rest_of_uri, "/"),
    };
    let upstream: SocketAddr = authority
        .parse()
        .or_else(|_| format!("{authority}:80").parse())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "not ip:port"))?;
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    socket.bind(&SocketAddr::new(ip, 0).into())?;
    socket.connect_timeout(&upstream.into(), Duration::from_secs(5))?;
    let mut server: TcpStream = socket.into();
    // Forwarded as it came, without hop-by-hop headers and adding none.
    let mut forwarded = format!("{} {path} HTTP/1.1\r\n", head.method);
    for (name, value) in &head.headers {
        let lower = name.to_ascii_lowercase();
        if lower.starts_with("proxy-") || lower == "connection" {
            continue;
        }
        forwarded.push_str(&format!("{name}: {value}\r\n"));
    }
    forwarded.push_str("Connection: close\r\n\r\n");
    server.write_all(forwarded.as_bytes())?;
    let mut response = Vec::new();
    server.set_read_timeout(Some(Duration::from_secs(10)))?;
    server.read_to_end(&mut response)?;
    client.write_all(&response)?;
    let _ = client.shutdown(Shutdown::Write);
    Ok(())
}

/// What the validator wrote for one proxy.
#[derive(Clone, Debug, PartialEq)]
pub struct Graded {
    pub is_active: bool,
    pub anonymity: Option<String>,
    pub supports_https: Option<bool>,
    pub https_failure: Option<String>,
    pub exit_ip: Option<IpAddr>,
    pub last_dead_reason: Option<String>,
}

/// Imports `list` (one proxy URL a line) into `db` with `proxy-pool import`,
/// runs `proxy-pool validate` once with `validation_target` and
/// `https_target` (its CA in `ca_file`), and reads back each listed
/// proxy's row, keyed by the line that listed it.
pub fn validate(
    db: &TestDb,
    validation_target: &str,
    https_target: &str,
    ca_file: &Path,
    list: &[String],
) -> Vec<(String, Graded)> {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("config.ini");
    let text = format!(
        "[database]\nurl = {}\n\
         [server]\nbind = 127.0.0.1:0\n\
         [fetcher]\nallow_private_addresses = true\nsource_urls = http://127.0.0.1:9/list.txt\n\
         [validator]\nvalidation_target = {validation_target}\n\
         https_target = {https_target}\nhttps_ca_file = {}\n\
         validation_timeout_ms = 5000\nconnect_timeout_ms = 1000\nvalidation_workers = 8\n",
        db.url,
        ca_file.display()
    );
    std::fs::write(&config, text).expect("write config.ini");
    let list_path = dir.path().join("list.txt");
    std::fs::write(&list_path, list.join("\n") + "\n").expect("write the list");
    let run = |args: &[&str]| {
        let output = Command::new(super::binary())
            .arg("--config")
            .arg(&config)
            .args(args)
            .env_remove("DATABASE_URL")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .output()
            .expect("run proxy-pool");
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
        assert!(
            output.status.success(),
            "proxy-pool {args:?} failed ({}):\nstdout: {stdout}\nstderr: {stderr}",
            output.status
        );
        eprintln!("proxy-pool {args:?}:\n{stdout}{stderr}");
    };
    run(&["import", &list_path.display().to_string()]);
    run(&["validate"]);

    let mut client = db.client();
    list.iter()
        .map(|line| {
            let url = url_parts(line);
            let row = client
                .query_one(
                    "SELECT is_active, anonymity, supports_https, https_failure, exit_ip,
                            last_dead_reason
                     FROM proxies
                     WHERE protocol = $1 AND ip = $2 AND port = $3
                       AND username IS NOT DISTINCT FROM $4",
                    &[&url.protocol, &url.ip, &i32::from(url.port), &url.username],
                )
                .unwrap_or_else(|err| panic!("the row of {line}: {err:?}"));
            let graded = Graded {
                is_active: row.get(0),
                anonymity: row.get(1),
                supports_https: row.get(2),
                https_failure: row.get(3),
                exit_ip: row.get(4),
                last_dead_reason: row.get(5),
            };
            (line.clone(), graded)
        })
        .collect()
}

struct UrlParts {
    protocol: String,
    ip: IpAddr,
    port: u16,
    username: Option<String>,
}

/// `scheme://[user:password@]ip:port`, as the tests write their lists.
fn url_parts(line: &str) -> UrlParts {
    let (protocol, rest) = line.split_once("://").expect("a scheme");
    let (username, host) = match rest.rsplit_once('@') {
        Some((auth, host)) => (Some(auth.split(':').next().unwrap_or("").to_owned()), host),
        None => (None, rest),
    };
    let address: SocketAddr = host.parse().expect("ip:port");
    UrlParts {
        protocol: protocol.to_owned(),
        ip: address.ip(),
        port: address.port(),
        username,
    }
}
