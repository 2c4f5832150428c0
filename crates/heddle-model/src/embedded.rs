//! The embedded default model, SmolLM2-135M-Instruct in GGUF Q4_1: where it lives and
//! whether the file there is intact.
//!
//! `scripts/fetch-model.sh` downloads it to the model directory,
//! `${HEDDLE_MODEL_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/heddle/models}`.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

use sha2::{Digest, Sha256};

use crate::error::{ModelError, Result};

pub const EMBEDDED_MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
/// The model id the server uses for the embedded model.
pub const EMBEDDED_MODEL_ID: &str = "SmolLM2-135M-Instruct";
/// Its size in bytes, checked before the digest (a truncated download fails fast).
pub const EMBEDDED_MODEL_SIZE: u64 = 98_362_432;

/// `scripts/embedded-model.sha256` ("<digest>  <file>"), the digest pinned for
/// scripts/fetch-model.sh too, so the two cannot drift apart.
const SHA256_FILE: &str = include_str!("../../../scripts/embedded-model.sha256");

/// The embedded model's SHA-256, lowercase hex.
pub fn embedded_model_sha256() -> &'static str {
    SHA256_FILE.split_whitespace().next().unwrap_or_default()
}

/// Where heddle keeps downloaded models. Empty variables count as unset, as in the
/// shell's `${VAR:-default}`.
pub fn model_dir() -> PathBuf {
    let var = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty());
    if let Some(dir) = var("HEDDLE_MODEL_DIR") {
        return PathBuf::from(dir);
    }
    let cache = var("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| var("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from(".cache"));
    cache.join("heddle").join("models")
}

/// The embedded model's path, after checking the file's size and SHA-256.
///
/// Hashing 98 MB takes a fraction of a second, so it is done once per process and file
/// version (path, size and modification time); later calls only look at the metadata.
pub fn embedded_model_path() -> Result<PathBuf> {
    let path = model_dir().join(EMBEDDED_MODEL_FILE);
    verify(&path, EMBEDDED_MODEL_SIZE, embedded_model_sha256())?;
    Ok(path)
}

type Verified = (PathBuf, u64, SystemTime);

fn verify(path: &Path, size: u64, sha256: &str) -> Result<()> {
    static VERIFIED: Mutex<Vec<Verified>> = Mutex::new(Vec::new());
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(ModelError::EmbeddedModelMissing {
                path: path.to_path_buf(),
            })
        }
        Err(source) => {
            return Err(ModelError::Io {
                path: path.to_path_buf(),
                source,
            })
        }
    };
    let corrupt = |reason: String| ModelError::EmbeddedModelCorrupt {
        path: path.to_path_buf(),
        reason,
    };
    if meta.len() != size {
        return Err(corrupt(format!("{} bytes, expected {size}", meta.len())));
    }
    let key = (
        path.to_path_buf(),
        meta.len(),
        meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
    );
    let mut verified = VERIFIED.lock().unwrap_or_else(|e| e.into_inner());
    if verified.contains(&key) {
        return Ok(());
    }
    let digest = sha256_file(path)?;
    if digest != sha256 {
        return Err(corrupt(format!("SHA-256 {digest}, expected {sha256}")));
    }
    verified.push(key);
    Ok(())
}

fn sha256_file(path: &Path) -> Result<String> {
    let io = |source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut file = std::fs::File::open(path).map_err(io)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).map_err(io)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pinned_digest_names_the_embedded_file() {
        let digest = embedded_model_sha256();
        assert_eq!(digest.len(), 64, "{SHA256_FILE:?}");
        assert!(digest
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
        assert_eq!(
            SHA256_FILE.split_whitespace().nth(1),
            Some(EMBEDDED_MODEL_FILE)
        );
    }

    #[test]
    fn a_missing_file_says_how_to_fetch_it() {
        let err = verify(Path::new("/nonexistent/heddle/model.gguf"), 1, "00").unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("scripts/fetch-model.sh"), "{msg}");
        assert!(msg.contains("/nonexistent/heddle/model.gguf"), "{msg}");
    }

    #[test]
    fn a_wrong_size_or_digest_is_corrupt() {
        let dir = std::env::temp_dir().join(format!("heddle-embedded-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("m.gguf");
        std::fs::write(&file, b"abc").unwrap();
        let err = verify(&file, 4, "00").unwrap_err().to_string();
        assert!(
            err.contains("corrupt") && err.contains("fetch-model.sh"),
            "{err}"
        );
        // sha256("abc")
        let abc = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        let err = verify(&file, 3, &abc.replace('b', "c"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("SHA-256"), "{err}");
        verify(&file, 3, abc).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
