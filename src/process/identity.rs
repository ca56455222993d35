//! The daemon's identity (docs/protocol.md §13): a long-term Ed25519 key in
//! its data directory, created on first start, and the self-signed
//! certificate that carries it on TLS links, made afresh at each start.
//!
//! The key is `identity.key` (PKCS#8, PEM, mode 0600) in `--data-dir`. A key
//! that cannot be read is an error, never a reason to make a new one: a
//! new key is a new fingerprint, which every client pinning this exit would
//! refuse. Two daemons that start at once with the same directory end up
//! with the same key (the first to link its file in place wins).

use halfpipe_proto::identity::Fingerprint;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// The key's file in the data directory.
pub const KEY_FILE: &str = "identity.key";

/// What this daemon shows on TLS links.
pub struct Identity {
    pub fingerprint: Fingerprint,
    /// A self-signed certificate carrying the key (R13.4, R13.8).
    pub cert: CertificateDer<'static>,
    key: PrivatePkcs8KeyDer<'static>,
    /// Where the key is (for messages).
    pub path: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("cannot use the data directory {dir}: {err} (give --data-dir a directory halfpipe may create and write)")]
    Dir { dir: PathBuf, err: io::Error },
    #[error("cannot read the identity key {path}: {err}")]
    Read { path: PathBuf, err: io::Error },
    #[error("{path} is not a usable identity key ({why}); halfpipe will not replace it: move it away to start with a new identity (and a new fingerprint)")]
    Corrupt { path: PathBuf, why: String },
    #[error("cannot write the identity key {path}: {err}")]
    Write { path: PathBuf, err: io::Error },
    #[error(
        "no data directory: set --data-dir (or HOME, XDG_DATA_HOME or systemd's STATE_DIRECTORY)"
    )]
    NoDefault,
}

/// The data directory when `--data-dir` is not given: systemd's
/// `StateDirectory=` (`$STATE_DIRECTORY`, `/var/lib/halfpipe` in the unit),
/// else `$XDG_DATA_HOME/halfpipe`, else `~/.local/share/halfpipe`.
pub fn default_data_dir() -> Option<PathBuf> {
    let var = |name| std::env::var_os(name).filter(|v| !v.is_empty());
    if let Some(state) = var("STATE_DIRECTORY") {
        // systemd may list several, separated by colons: the first is ours.
        let first = state.to_string_lossy().split(':').next()?.to_owned();
        return Some(PathBuf::from(first));
    }
    if let Some(xdg) = var("XDG_DATA_HOME") {
        return Some(PathBuf::from(xdg).join("halfpipe"));
    }
    var("HOME").map(|home| PathBuf::from(home).join(".local/share/halfpipe"))
}

impl Identity {
    /// The identity kept in `dir`, made there first if there is none.
    pub fn load_or_create(dir: &Path) -> Result<Identity, IdentityError> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|err| IdentityError::Dir {
                dir: dir.to_owned(),
                err,
            })?;
        let path = dir.join(KEY_FILE);
        let pem = match fs::read_to_string(&path) {
            Ok(pem) => pem,
            Err(e) if e.kind() == io::ErrorKind::NotFound => create(dir, &path)?,
            Err(err) => return Err(IdentityError::Read { path, err }),
        };
        if let Ok(meta) = fs::metadata(&path) {
            if meta.permissions().mode() & 0o077 != 0 {
                tracing::warn!(
                    "{} can be read by others (mode {:o}): chmod 600 it",
                    path.display(),
                    meta.permissions().mode() & 0o777
                );
            }
        }
        Identity::from_pem(&pem, path)
    }

    fn from_pem(pem: &str, path: PathBuf) -> Result<Identity, IdentityError> {
        let corrupt = |why: String| IdentityError::Corrupt {
            path: path.clone(),
            why,
        };
        let pair = rcgen::KeyPair::from_pem(pem).map_err(|e| corrupt(e.to_string()))?;
        let cert = rcgen::CertificateParams::new(vec!["halfpipe".to_owned()])
            .and_then(|params| params.self_signed(&pair))
            .map_err(|e| corrupt(e.to_string()))?;
        Ok(Identity {
            fingerprint: Fingerprint::of_spki(&pair.public_key_der()),
            cert: cert.der().clone(),
            key: PrivatePkcs8KeyDer::from(pair.serialize_der()),
            path,
        })
    }

    /// The private key, for rustls.
    pub fn key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(self.key.clone_key())
    }
}

/// Makes a key and links it into place as `path`, unless another process
/// did first: then that one is the key. Returns the key's PEM.
fn create(dir: &Path, path: &Path) -> Result<String, IdentityError> {
    let write_err = |err| IdentityError::Write {
        path: path.to_owned(),
        err,
    };
    let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519)
        .map_err(|e| write_err(io::Error::other(format!("cannot make a key: {e}"))))?;
    let pem = pair.serialize_pem();
    let mut tag = [0u8; 8];
    getrandom::getrandom(&mut tag).expect("the OS random number generator failed");
    let tmp = dir.join(format!(".{KEY_FILE}.{}", u64::from_ne_bytes(tag)));
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(write_err)?;
    let written = f.write_all(pem.as_bytes()).and_then(|()| f.sync_all());
    drop(f);
    let linked = written.and_then(|()| fs::hard_link(&tmp, path));
    let _ = fs::remove_file(&tmp);
    match linked {
        Ok(()) => {
            tracing::info!("made a new identity key {}", path.display());
            Ok(pem)
        }
        // Another daemon made one first: use it.
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            fs::read_to_string(path).map_err(|err| IdentityError::Read {
                path: path.to_owned(),
                err,
            })
        }
        Err(e) => Err(write_err(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("halfpipe-id-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn a_key_is_made_once_with_mode_0600_and_kept() {
        let dir = scratch("kept");
        let first = Identity::load_or_create(&dir).unwrap();
        let mode = fs::metadata(dir.join(KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let again = Identity::load_or_create(&dir).unwrap();
        assert_eq!(first.fingerprint, again.fingerprint);
        // The fingerprint is the SHA-256 of the certificate's SPKI.
        let cert = webpki::EndEntityCert::try_from(&first.cert).unwrap();
        let spki = cert.subject_public_key_info();
        assert_eq!(Fingerprint::of_spki(spki.as_ref()), first.fingerprint);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_corrupt_key_is_an_error_and_left_alone() {
        let dir = scratch("corrupt");
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join(KEY_FILE), "not a key").unwrap();
        let e = Identity::load_or_create(&dir).err().expect("an error");
        assert!(matches!(e, IdentityError::Corrupt { .. }), "{e}");
        assert!(e.to_string().contains("will not replace it"), "{e}");
        assert_eq!(fs::read_to_string(dir.join(KEY_FILE)).unwrap(), "not a key");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn an_unwritable_directory_is_an_error() {
        // A regular file stands where the directory should be.
        let file = scratch("file");
        fs::write(&file, "").unwrap();
        let e = Identity::load_or_create(&file.join("sub"))
            .err()
            .expect("an error");
        assert!(matches!(e, IdentityError::Dir { .. }), "{e}");
        fs::remove_file(&file).unwrap();
    }

    #[test]
    fn daemons_starting_at_once_share_one_key() {
        let dir = scratch("race");
        let fingerprints: Vec<Fingerprint> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..8)
                .map(|_| s.spawn(|| Identity::load_or_create(&dir).unwrap().fingerprint))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert!(fingerprints.iter().all(|f| *f == fingerprints[0]));
        fs::remove_dir_all(&dir).unwrap();
    }
}
