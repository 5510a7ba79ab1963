//! The stats snapshot file: every source's per-proxy stats, so that a restart
//! does not forget which proxies work for whom, and the active set, so that a
//! restart while the database is down still has proxies to serve. Only file
//! I/O lives here; the state manager makes the [`SnapshotData`] copy and
//! restores from it.
//!
//! Layout: a 28-byte header (magic `PPSNAP\0\x01`, format version u32 LE,
//! payload length u64 LE, FNV-1a 64 checksum of the payload u64 LE), then the
//! bincode 2 (standard config) encoding of [`SnapshotData`]. A file is
//! replaced atomically: written to a temporary file in the same directory,
//! fsynced, renamed over the old one, and the directory fsynced.
//!
//! Versions: 1 held the stats only; 2 adds the active set; 3 adds what the
//! choice learns (each entry's discounted counts) and each active proxy's
//! exit address. All are read (a version 1 file gives an empty active set;
//! entries of versions 1 and 2 have no discounted counts, which the restore
//! derives from their counts); only the current one is written.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

pub const MAGIC: [u8; 8] = *b"PPSNAP\0\x01";
/// Bumped whenever [`SnapshotData`]'s encoding changes. Files of this
/// version and of [`OLDEST_READABLE_VERSION`] onwards are read, each with
/// its own layout; any other is treated as unreadable (moved aside), never
/// misread.
pub const FORMAT_VERSION: u32 = 3;
/// The first version, stats only ([`SnapshotDataV1`]).
pub const OLDEST_READABLE_VERSION: u32 = 1;
const HEADER_LEN: usize = 28;
/// Far above any real snapshot (a million entries and 100,000 active proxies
/// take about 25 MB); a larger file is not one of ours.
const MAX_PAYLOAD_BYTES: u64 = 1 << 32;

/// Everything a snapshot holds. Entries and active proxies name their proxy
/// by an index into `urls`, so each URL (the proxy's stable identity across
/// restarts and database changes, credentials included) is stored once.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SnapshotData {
    /// When the copy was taken, unix milliseconds.
    pub taken_at_ms: i64,
    pub urls: Vec<String>,
    pub sources: Vec<SourceSnapshot>,
    /// The active set as it was served when the copy was taken.
    pub active: Vec<ActiveSnapshot>,
}

/// A version 1 payload: a version 2 one without the active set.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SnapshotDataV1 {
    pub taken_at_ms: i64,
    pub urls: Vec<String>,
    pub sources: Vec<SourceSnapshotV2>,
}

/// A version 2 payload: entries without discounted counts, active proxies
/// without their exit.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SnapshotDataV2 {
    pub taken_at_ms: i64,
    pub urls: Vec<String>,
    pub sources: Vec<SourceSnapshotV2>,
    pub active: Vec<ActiveSnapshotV2>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SourceSnapshotV2 {
    pub name: String,
    pub requests: u64,
    pub feedbacks: u64,
    pub entries: Vec<EntrySnapshotV2>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EntrySnapshotV2 {
    pub url: u32,
    pub score: i32,
    pub success_count: u64,
    pub failure_count: u64,
    pub banned_until_ms: Option<i64>,
    pub ban_count: u32,
    pub last_used_ms: i64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ActiveSnapshotV2 {
    pub id: i64,
    pub url: u32,
    pub latency_ms: Option<u32>,
    pub anonymity: Option<String>,
    pub country: Option<String>,
    pub supports_https: Option<bool>,
    pub last_validated_ms: Option<i64>,
    pub anonymity_evidence: Option<String>,
}

impl From<SnapshotDataV1> for SnapshotData {
    fn from(v1: SnapshotDataV1) -> SnapshotData {
        SnapshotData::from(SnapshotDataV2 {
            taken_at_ms: v1.taken_at_ms,
            urls: v1.urls,
            sources: v1.sources,
            active: Vec::new(),
        })
    }
}

impl From<SnapshotDataV2> for SnapshotData {
    fn from(v2: SnapshotDataV2) -> SnapshotData {
        let sources = v2
            .sources
            .into_iter()
            .map(|source| SourceSnapshot {
                name: source.name,
                requests: source.requests,
                feedbacks: source.feedbacks,
                entries: source
                    .entries
                    .into_iter()
                    .map(|entry| EntrySnapshot {
                        url: entry.url,
                        score: entry.score,
                        success_count: entry.success_count,
                        failure_count: entry.failure_count,
                        banned_until_ms: entry.banned_until_ms,
                        ban_count: entry.ban_count,
                        last_used_ms: entry.last_used_ms,
                        discounted: None,
                    })
                    .collect(),
            })
            .collect();
        let active = v2
            .active
            .into_iter()
            .map(|active| ActiveSnapshot {
                id: active.id,
                url: active.url,
                latency_ms: active.latency_ms,
                anonymity: active.anonymity,
                country: active.country,
                supports_https: active.supports_https,
                last_validated_ms: active.last_validated_ms,
                anonymity_evidence: active.anonymity_evidence,
                exit_ip: None,
            })
            .collect();
        SnapshotData {
            taken_at_ms: v2.taken_at_ms,
            urls: v2.urls,
            sources,
            active,
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SourceSnapshot {
    pub name: String,
    pub requests: u64,
    pub feedbacks: u64,
    pub entries: Vec<EntrySnapshot>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EntrySnapshot {
    /// Index into [`SnapshotData::urls`].
    pub url: u32,
    pub score: i32,
    pub success_count: u64,
    pub failure_count: u64,
    pub banned_until_ms: Option<i64>,
    /// Bans so far of this proxy for this source (each doubles the next).
    pub ban_count: u32,
    pub last_used_ms: i64,
    /// The recency-discounted successes and failures the choice draws
    /// from; `None` in files of versions 1 and 2.
    pub discounted: Option<(f32, f32)>,
}

/// One active proxy: what get-proxy answers with, as its last successful
/// check found it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ActiveSnapshot {
    /// The database row's id.
    pub id: i64,
    /// Index into [`SnapshotData::urls`]: protocol, address and credentials.
    pub url: u32,
    pub latency_ms: Option<u32>,
    /// `elite`, `anonymous` or `transparent`.
    pub anonymity: Option<String>,
    /// ISO 3166 alpha-2.
    pub country: Option<String>,
    pub supports_https: Option<bool>,
    /// Unix milliseconds.
    pub last_validated_ms: Option<i64>,
    /// Which headers gave the proxy away (none for elite proxies).
    pub anonymity_evidence: Option<String>,
    /// Where its connections leave from, when known.
    pub exit_ip: Option<std::net::IpAddr>,
}

impl SnapshotData {
    pub fn entry_count(&self) -> usize {
        self.sources.iter().map(|source| source.entries.len()).sum()
    }
}

/// What writing a snapshot did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotInfo {
    pub bytes: u64,
    pub entries: usize,
    pub active: usize,
    pub duration: Duration,
}

/// What was found at the snapshot path.
#[derive(Debug)]
pub enum Loaded {
    /// No file: start with empty stats.
    Missing,
    Loaded(SnapshotData),
    /// The file could not be read as a snapshot; it was renamed to
    /// `moved_to` so that it can be examined, and stats start empty.
    Corrupt {
        moved_to: PathBuf,
        reason: String,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("cannot write snapshot {path}: {source}")]
    Write { path: PathBuf, source: io::Error },
    #[error("cannot encode snapshot: {0}")]
    Encode(#[from] bincode::error::EncodeError),
    #[error("cannot read snapshot {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("cannot move unreadable snapshot {path} aside: {source}")]
    MoveAside { path: PathBuf, source: io::Error },
}

fn bincode_config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<{ MAX_PAYLOAD_BYTES as usize }>()
}

/// Writes `data` to `path` atomically, readable by the owner only.
pub fn write_atomic(path: &Path, data: &SnapshotData) -> Result<SnapshotInfo, SnapshotError> {
    let started = Instant::now();
    let temp = temp_path(path);
    let write_error = |source| SnapshotError::Write {
        path: path.to_path_buf(),
        source,
    };
    let bytes = match write_file(&temp, data) {
        Ok(bytes) => bytes,
        Err(err) => {
            let _ = fs::remove_file(&temp);
            return Err(err);
        }
    };
    if let Err(err) = fs::rename(&temp, path) {
        let _ = fs::remove_file(&temp);
        return Err(write_error(err));
    }
    sync_parent_dir(path).map_err(write_error)?;
    Ok(SnapshotInfo {
        bytes,
        entries: data.entry_count(),
        active: data.active.len(),
        duration: started.elapsed(),
    })
}

/// Removes the temporary files of writers that died mid-write (a crash or a
/// SIGKILL leaves one each; they would pile up). Call before this process
/// writes. Returns how many were removed.
pub fn remove_stale_temps(path: &Path) -> usize {
    let Some(name) = path.file_name().map(|n| n.to_string_lossy().into_owned()) else {
        return 0;
    };
    let prefix = format!(".{name}.tmp-");
    let dir = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    let Ok(entries) = fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .filter(|entry| entry.file_name().to_string_lossy().starts_with(&prefix))
        .filter(|entry| fs::remove_file(entry.path()).is_ok())
        .count()
}

fn temp_path(path: &Path) -> PathBuf {
    // Unique per process and call, so two writers never share a temp file.
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let name = path
        .file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_else(|| "snapshot".into());
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    path.with_file_name(format!(".{name}.tmp-{}-{n}", std::process::id()))
}

fn write_file(temp: &Path, data: &SnapshotData) -> Result<u64, SnapshotError> {
    let io_error = |source| SnapshotError::Write {
        path: temp.to_path_buf(),
        source,
    };
    let file = create_private(temp).map_err(io_error)?;
    let mut writer = BufWriter::with_capacity(1 << 16, file);
    // The header needs the payload's length and checksum: reserve it, stream
    // the payload, then fill it in.
    writer.write_all(&[0u8; HEADER_LEN]).map_err(io_error)?;
    let mut hashing = Hashing::new(&mut writer);
    bincode::serde::encode_into_std_write(data, &mut hashing, bincode_config())?;
    let (payload_len, checksum) = (hashing.len, hashing.hash);
    let mut file = writer
        .into_inner()
        .map_err(|err| io_error(err.into_error()))?;
    file.seek(SeekFrom::Start(0)).map_err(io_error)?;
    file.write_all(&header(payload_len, checksum))
        .map_err(io_error)?;
    file.sync_all().map_err(io_error)?;
    Ok(HEADER_LEN as u64 + payload_len)
}

fn create_private(path: &Path) -> io::Result<File> {
    let mut options = OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    match options.open(path) {
        Err(err) if err.kind() == io::ErrorKind::AlreadyExists => {
            // A leftover of a crashed writer with our pid: replace it, so the
            // new file gets the private mode (mode applies on creation only).
            fs::remove_file(path)?;
            options.open(path)
        }
        other => other,
    }
}

fn sync_parent_dir(path: &Path) -> io::Result<()> {
    #[cfg(unix)]
    {
        let dir = match path.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => parent,
            _ => Path::new("."),
        };
        File::open(dir)?.sync_all()?;
    }
    #[cfg(not(unix))]
    let _ = path;
    Ok(())
}

fn header(payload_len: u64, checksum: u64) -> [u8; HEADER_LEN] {
    let mut header = [0u8; HEADER_LEN];
    header[..8].copy_from_slice(&MAGIC);
    header[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    header[12..20].copy_from_slice(&payload_len.to_le_bytes());
    header[20..28].copy_from_slice(&checksum.to_le_bytes());
    header
}

/// Reads the snapshot at `path`. A file that is not a valid snapshot is
/// moved aside to `<path>.corrupt-<unix seconds>` and reported as
/// [`Loaded::Corrupt`]; only failing to read or move it is an error.
pub fn load(path: &Path) -> Result<Loaded, SnapshotError> {
    let read_error = |source| SnapshotError::Read {
        path: path.to_path_buf(),
        source,
    };
    let file = match File::open(path) {
        Ok(file) => file,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(Loaded::Missing),
        Err(err) => return Err(read_error(err)),
    };
    let reason = match read_snapshot(file) {
        Ok(data) => return Ok(Loaded::Loaded(data)),
        Err(ReadFailure::Io(err)) => return Err(read_error(err)),
        Err(ReadFailure::Invalid(reason)) => reason,
    };
    let seconds = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_secs());
    let mut moved_to = path.as_os_str().to_owned();
    moved_to.push(format!(".corrupt-{seconds}"));
    let moved_to = PathBuf::from(moved_to);
    fs::rename(path, &moved_to).map_err(|source| SnapshotError::MoveAside {
        path: path.to_path_buf(),
        source,
    })?;
    log::warn!(
        "snapshot {} is unreadable ({reason}); moved it to {} and starting with empty stats",
        path.display(),
        moved_to.display()
    );
    Ok(Loaded::Corrupt { moved_to, reason })
}

enum ReadFailure {
    Io(io::Error),
    Invalid(String),
}

fn read_snapshot(file: File) -> Result<SnapshotData, ReadFailure> {
    let file_len = file.metadata().map_err(ReadFailure::Io)?.len();
    let mut reader = BufReader::with_capacity(1 << 16, file);
    let mut header = [0u8; HEADER_LEN];
    if file_len < HEADER_LEN as u64 {
        return Err(ReadFailure::Invalid(format!(
            "expected a {HEADER_LEN}-byte header, found a {file_len}-byte file"
        )));
    }
    reader.read_exact(&mut header).map_err(ReadFailure::Io)?;
    if header[..8] != MAGIC {
        return Err(ReadFailure::Invalid(
            "expected the PPSNAP magic bytes, found others".into(),
        ));
    }
    let field = |range: std::ops::Range<usize>| {
        let mut bytes = [0u8; 8];
        bytes[..range.len()].copy_from_slice(&header[range]);
        u64::from_le_bytes(bytes)
    };
    let version = field(8..12);
    if !(u64::from(OLDEST_READABLE_VERSION)..=u64::from(FORMAT_VERSION)).contains(&version) {
        return Err(ReadFailure::Invalid(format!(
            "expected format version {OLDEST_READABLE_VERSION} to {FORMAT_VERSION}, found {version}"
        )));
    }
    let payload_len = field(12..20);
    let checksum = field(20..28);
    let actual_len = file_len - HEADER_LEN as u64;
    if payload_len != actual_len || payload_len > MAX_PAYLOAD_BYTES {
        return Err(ReadFailure::Invalid(format!(
            "header promises {payload_len} payload bytes, file has {actual_len}"
        )));
    }
    let mut hashing = Hashing::new(reader.take(payload_len));
    let decoded = if version == 1 {
        bincode::serde::decode_from_std_read::<SnapshotDataV1, _, _>(&mut hashing, bincode_config())
            .map(SnapshotData::from)
    } else if version == 2 {
        bincode::serde::decode_from_std_read::<SnapshotDataV2, _, _>(&mut hashing, bincode_config())
            .map(SnapshotData::from)
    } else {
        bincode::serde::decode_from_std_read(&mut hashing, bincode_config())
    };
    let data =
        decoded.map_err(|err| ReadFailure::Invalid(format!("cannot decode the payload: {err}")))?;
    if hashing.len != payload_len {
        return Err(ReadFailure::Invalid(format!(
            "payload decoded from {} of its {payload_len} bytes",
            hashing.len
        )));
    }
    if hashing.hash != checksum {
        return Err(ReadFailure::Invalid("payload checksum mismatch".into()));
    }
    Ok(data)
}

/// Counts and FNV-1a-hashes the bytes that pass through it.
struct Hashing<T> {
    inner: T,
    len: u64,
    hash: u64,
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

impl<T> Hashing<T> {
    fn new(inner: T) -> Hashing<T> {
        Hashing {
            inner,
            len: 0,
            hash: FNV_OFFSET,
        }
    }

    fn update(&mut self, bytes: &[u8]) {
        let mut hash = self.hash;
        for &byte in bytes {
            hash = (hash ^ u64::from(byte)).wrapping_mul(FNV_PRIME);
        }
        self.hash = hash;
        self.len += bytes.len() as u64;
    }
}

impl<T: Write> Write for Hashing<T> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let written = self.inner.write(buf)?;
        self.update(&buf[..written]);
        Ok(written)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

impl<T: Read> Read for Hashing<T> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let read = self.inner.read(buf)?;
        self.update(&buf[..read]);
        Ok(read)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temporary_files_of_crashed_writers_are_removed_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("stats.bin");
        for name in [
            ".stats.bin.tmp-123-0",
            ".stats.bin.tmp-456-7",
            "stats.bin",
            "other.bin",
            ".other.bin.tmp-1-0",
        ] {
            fs::write(dir.path().join(name), b"x").unwrap();
        }
        assert_eq!(remove_stale_temps(&path), 2);
        let mut left: Vec<String> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, [".other.bin.tmp-1-0", "other.bin", "stats.bin"]);
    }

    fn sample() -> SnapshotData {
        SnapshotData {
            taken_at_ms: 1_700_000_000_000,
            urls: vec![
                "http://1.2.3.4:8080".into(),
                "socks5://u:p@5.6.7.8:1080".into(),
                "https://9.9.9.9:443".into(),
            ],
            sources: vec![SourceSnapshot {
                name: "my_app".into(),
                requests: 12,
                feedbacks: 3,
                entries: vec![
                    EntrySnapshot {
                        url: 0,
                        score: 7,
                        success_count: 7,
                        failure_count: 0,
                        banned_until_ms: None,
                        ban_count: 0,
                        last_used_ms: 1_699_999_999_000,
                        discounted: Some((5.2, 0.0)),
                    },
                    EntrySnapshot {
                        url: 1,
                        score: -20,
                        success_count: 0,
                        failure_count: 4,
                        banned_until_ms: Some(1_700_001_800_000),
                        ban_count: 2,
                        last_used_ms: 1_699_999_999_500,
                        discounted: Some((0.0, 3.4)),
                    },
                ],
            }],
            active: vec![
                ActiveSnapshot {
                    id: 41,
                    url: 1,
                    latency_ms: Some(150),
                    anonymity: Some("elite".into()),
                    country: Some("DE".into()),
                    supports_https: None,
                    last_validated_ms: Some(1_699_999_990_000),
                    anonymity_evidence: None,
                    exit_ip: Some("5.6.7.9".parse().unwrap()),
                },
                ActiveSnapshot {
                    id: 42,
                    url: 2,
                    latency_ms: None,
                    anonymity: None,
                    country: None,
                    supports_https: Some(true),
                    last_validated_ms: None,
                    anonymity_evidence: Some("Via: 1.1 squid".into()),
                    exit_ip: None,
                },
            ],
        }
    }

    fn corrupt_files(dir: &Path) -> Vec<PathBuf> {
        fs::read_dir(dir)
            .unwrap()
            .map(|entry| entry.unwrap().path())
            .filter(|path| path.to_string_lossy().contains(".corrupt-"))
            .collect()
    }

    #[test]
    fn roundtrip_keeps_everything_and_the_file_private() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("stats.bin");
        let info = write_atomic(&path, &sample()).unwrap();
        assert_eq!(info.entries, 2);
        assert_eq!(info.active, 2);
        assert_eq!(info.bytes, fs::metadata(&path).unwrap().len());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        match load(&path).unwrap() {
            Loaded::Loaded(data) => assert_eq!(data, sample()),
            other => panic!("expected the snapshot, got {other:?}"),
        }
        // No temporary file is left behind.
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
        // Overwriting works too.
        write_atomic(&path, &SnapshotData::default()).unwrap();
        assert!(matches!(load(&path).unwrap(), Loaded::Loaded(data) if data.sources.is_empty()));
    }

    #[test]
    fn missing_file_means_empty() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            load(&dir.path().join("absent.bin")).unwrap(),
            Loaded::Missing
        ));
    }

    fn assert_moved_aside(bytes: &[u8], expected_reason: &str) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("stats.bin");
        fs::write(&path, bytes).unwrap();
        match load(&path).unwrap() {
            Loaded::Corrupt { moved_to, reason } => {
                assert!(reason.contains(expected_reason), "{reason}");
                assert_eq!(fs::read(&moved_to).unwrap(), bytes);
                let name = moved_to.file_name().unwrap().to_string_lossy().into_owned();
                assert!(name.starts_with("stats.bin.corrupt-"), "{name}");
            }
            other => panic!("expected corrupt, got {other:?}"),
        }
        assert!(!path.exists());
        assert_eq!(corrupt_files(dir.path()).len(), 1);
    }

    fn valid_bytes() -> Vec<u8> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("stats.bin");
        write_atomic(&path, &sample()).unwrap();
        fs::read(path).unwrap()
    }

    #[test]
    fn wrong_magic_is_moved_aside() {
        let mut bytes = valid_bytes();
        bytes[0] = b'X';
        assert_moved_aside(&bytes, "magic");
    }

    #[test]
    fn other_format_version_is_moved_aside() {
        for version in [0, FORMAT_VERSION + 1, 9] {
            let mut bytes = valid_bytes();
            bytes[8..12].copy_from_slice(&version.to_le_bytes());
            assert_moved_aside(&bytes, "version");
        }
    }

    /// Guards the upgrade: a file written by a version 1 binary (this one
    /// was, from the stats of `sample`) keeps its stats, with no active set.
    #[test]
    fn a_version_1_file_loads_with_an_empty_active_set() {
        let bytes = include_bytes!("../tests/fixtures/snapshot-v1.bin");
        assert_eq!(bytes[8..12], 1u32.to_le_bytes());
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("stats.bin");
        fs::write(&path, bytes).unwrap();
        let mut expected = SnapshotData {
            urls: sample().urls[..2].to_vec(),
            active: Vec::new(),
            ..sample()
        };
        for entry in &mut expected.sources[0].entries {
            entry.discounted = None;
        }
        match load(&path).unwrap() {
            Loaded::Loaded(data) => assert_eq!(data, expected),
            other => panic!("expected the version 1 snapshot, got {other:?}"),
        }
        assert!(corrupt_files(dir.path()).is_empty());
        assert_eq!(
            fs::read(&path).unwrap(),
            bytes,
            "a load leaves the file as it is"
        );
    }

    /// `sample` as a version 2 binary wrote it: no discounted counts, no
    /// exits.
    fn sample_v2() -> SnapshotDataV2 {
        let current = sample();
        SnapshotDataV2 {
            taken_at_ms: current.taken_at_ms,
            urls: current.urls,
            sources: current
                .sources
                .into_iter()
                .map(|source| SourceSnapshotV2 {
                    name: source.name,
                    requests: source.requests,
                    feedbacks: source.feedbacks,
                    entries: source
                        .entries
                        .into_iter()
                        .map(|e| EntrySnapshotV2 {
                            url: e.url,
                            score: e.score,
                            success_count: e.success_count,
                            failure_count: e.failure_count,
                            banned_until_ms: e.banned_until_ms,
                            ban_count: e.ban_count,
                            last_used_ms: e.last_used_ms,
                        })
                        .collect(),
                })
                .collect(),
            active: current
                .active
                .into_iter()
                .map(|a| ActiveSnapshotV2 {
                    id: a.id,
                    url: a.url,
                    latency_ms: a.latency_ms,
                    anonymity: a.anonymity,
                    country: a.country,
                    supports_https: a.supports_https,
                    last_validated_ms: a.last_validated_ms,
                    anonymity_evidence: a.anonymity_evidence,
                })
                .collect(),
        }
    }

    /// Guards the upgrade from version 2: its stats and active set load,
    /// without discounted counts (the restore derives them) or exits.
    #[test]
    fn a_version_2_file_loads_without_discounted_counts_or_exits() {
        let payload = bincode::serde::encode_to_vec(sample_v2(), bincode_config()).unwrap();
        let mut hashing = Hashing::new(io::sink());
        hashing.write_all(&payload).unwrap();
        let mut bytes = header(payload.len() as u64, hashing.hash).to_vec();
        bytes[8..12].copy_from_slice(&2u32.to_le_bytes());
        bytes.extend_from_slice(&payload);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("stats.bin");
        fs::write(&path, &bytes).unwrap();
        let mut expected = sample();
        for entry in &mut expected.sources[0].entries {
            entry.discounted = None;
        }
        for active in &mut expected.active {
            active.exit_ip = None;
        }
        match load(&path).unwrap() {
            Loaded::Loaded(data) => assert_eq!(data, expected),
            other => panic!("expected the version 2 snapshot, got {other:?}"),
        }
    }

    #[test]
    fn a_current_payload_under_a_version_1_header_is_moved_aside() {
        let mut bytes = valid_bytes();
        bytes[8..12].copy_from_slice(&1u32.to_le_bytes());
        assert_moved_aside(&bytes, "payload");
    }

    #[test]
    fn truncated_file_is_moved_aside() {
        let bytes = valid_bytes();
        assert_moved_aside(&bytes[..bytes.len() - 5], "payload bytes");
        assert_moved_aside(&bytes[..10], "header");
        assert_moved_aside(b"", "header");
    }

    #[test]
    fn flipped_payload_byte_is_moved_aside() {
        let mut bytes = valid_bytes();
        let last = bytes.len() - 1;
        bytes[last] ^= 0x40;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("stats.bin");
        fs::write(&path, &bytes).unwrap();
        assert!(matches!(load(&path).unwrap(), Loaded::Corrupt { .. }));
    }

    #[test]
    fn garbage_payload_with_a_valid_header_is_moved_aside() {
        let garbage = [0xffu8; 64];
        let mut hashing = Hashing::new(Vec::new());
        hashing.write_all(&garbage).unwrap();
        let mut bytes = header(64, hashing.hash).to_vec();
        bytes.extend_from_slice(&garbage);
        assert_moved_aside(&bytes, "decode");
    }
}
