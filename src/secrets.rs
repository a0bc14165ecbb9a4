//! Secrets generated once and kept in the data directory, so a restart keeps them.

use anyhow::{Context, Result};
use base64::Engine as _;
use std::io::Write as _;
use std::path::Path;

/// Reads the secret stored at `path`, or generates 32 random bytes (base64) and
/// stores them there, readable by the owner only.
pub fn load_or_generate(path: &Path) -> Result<String> {
    if path.exists() {
        let secret = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let secret = secret.trim().to_string();
        if !secret.is_empty() {
            return Ok(secret);
        }
    }
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(|e| anyhow::anyhow!("the OS random number generator failed: {e}"))?;
    let secret = base64::engine::general_purpose::STANDARD_NO_PAD.encode(bytes);
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    file.write_all(secret.as_bytes())?;
    file.sync_all()?;
    Ok(secret)
}

/// Creates the data directory (owner-only on Unix) if it does not exist.
pub fn ensure_data_dir(path: &Path) -> Result<()> {
    if !path.exists() {
        std::fs::create_dir_all(path).with_context(|| format!("creating data directory {}", path.display()))?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700))?;
        }
    }
    Ok(())
}
