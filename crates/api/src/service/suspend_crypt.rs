//! Encryption at rest of a suspended microvm under its `kmsKeyIdentifier` (the run's, or
//! its image's when the run names none): the files Hearth writes of it when it is not
//! running, its saved RAM and devices (`state`) and its disk (`disk.qcow2`), are encrypted
//! with the key's material ([`crate::at_rest::encrypt_file`]) once the suspend has written
//! them, and decrypted before the resume reads them.
//!
//! Not encrypted: `manifest.json` and `memory.json` (sizes, checksums, the machine; no
//! guest data), and `memory`, a hard link to the image's template RAM, which is the
//! image's, not the microvm's (a suspended VM's `state` holds every page it changed).
//!
//! Crash safety: each file goes `f` → `f.enc.tmp` (written, fsynced) → `f.enc` (renamed,
//! directory fsynced) → `f` removed, and back the same way through `f.dec.tmp`. So at any
//! crash point a file is the plain one, the encrypted one, or both complete and equal,
//! never only a partial: [`normalize`] settles each toward the wanted form, and both
//! directions can be run again from wherever they stopped. The microvm's state says which
//! form is wanted: SUSPENDED files are encrypted; reconcile decrypts before it settles a
//! microvm and encrypts again if it settles SUSPENDED (docs/RELIABILITY.md).

use super::Service;
use crate::at_rest::{decrypt_file, encrypt_file, sync_dir, AtRestError, SUFFIX};
use crate::error::{ApiError, Kind};
use crate::store::MicrovmRecord;
use serde_json::Value;
use std::path::Path;

/// The member of a microvm's spec that holds its key's ARN (resolved at RunMicrovm, so
/// the alias it was named by can change without stranding its files).
pub(super) const KEY_FIELD: &str = "hearthKmsKey";

/// The files of a suspended directory that hold the microvm's data.
fn data_files(dir: &Path) -> Vec<String> {
    let mut names = vec!["state".to_owned()];
    let manifest = std::fs::read(dir.join("manifest.json")).or_else(|_| std::fs::read(dir.join(hearth_vmm::restore::RETIRED_MANIFEST)));
    let disk =
        manifest.ok().and_then(|b| serde_json::from_slice::<Value>(&b).ok()).and_then(|v| v.get("disk")?.as_str().map(str::to_owned));
    names.push(disk.filter(|d| !d.contains('/') && !d.starts_with('.')).unwrap_or_else(|| "disk.qcow2".into()));
    names
}

pub(super) fn enc(dir: &Path, f: &str) -> std::path::PathBuf {
    dir.join(format!("{f}{SUFFIX}"))
}

/// Settles every data file of `dir` toward encrypted (`true`) or plain: temporary files
/// go; where both forms exist (both complete and equal) the unwanted one goes.
pub(super) fn normalize(dir: &Path, encrypted: bool) {
    normalize_names(dir, &data_files(dir), encrypted);
}

/// [`normalize`] for the files `names` of `dir`.
pub(super) fn normalize_names(dir: &Path, names: &[String], encrypted: bool) {
    for f in names {
        let _ = std::fs::remove_file(dir.join(format!("{f}{SUFFIX}.tmp")));
        let _ = std::fs::remove_file(dir.join(format!("{f}.dec.tmp")));
        if dir.join(f).exists() && enc(dir, f).exists() {
            let _ = std::fs::remove_file(if encrypted { dir.join(f) } else { enc(dir, f) });
        }
    }
    sync_dir(dir);
}

/// True when any data file of `dir` is in its encrypted form.
pub(super) fn has_encrypted(dir: &Path) -> bool {
    data_files(dir).iter().any(|f| enc(dir, f).exists())
}

/// Encrypts every plain data file of `dir`; bytes written.
pub(super) fn encrypt_dir(key: &[u8; 32], dir: &Path) -> Result<u64, AtRestError> {
    encrypt_names(key, dir, &data_files(dir), "suspend.encrypted-one")
}

/// Encrypts the plain files `names` of `dir`, each `f` → `f.enc.tmp` → `f.enc` → `f`
/// removed (`crash_point` between the last two); bytes written. Run again, it goes on from
/// wherever a crash stopped it.
pub(super) fn encrypt_names(key: &[u8; 32], dir: &Path, names: &[String], crash_point: &str) -> Result<u64, AtRestError> {
    normalize_names(dir, names, true);
    let mut n = 0;
    for f in names {
        let f = f.as_str();
        let plain = dir.join(f);
        if !plain.exists() {
            continue;
        }
        let tmp = dir.join(format!("{f}{SUFFIX}.tmp"));
        n += encrypt_file(key, f, &plain, &tmp)?;
        std::fs::rename(&tmp, enc(dir, f)).map_err(|source| AtRestError::Io { what: format!("install {f}{SUFFIX}"), source })?;
        sync_dir(dir);
        hearth_vmm::crash::point(crash_point);
        std::fs::remove_file(&plain).map_err(|source| AtRestError::Io { what: format!("remove the plain {f}"), source })?;
        sync_dir(dir);
    }
    Ok(n)
}

/// Decrypts every encrypted data file of `dir`; bytes restored.
pub(super) fn decrypt_dir(key: &[u8; 32], dir: &Path) -> Result<u64, AtRestError> {
    normalize(dir, false);
    let mut n = 0;
    for f in data_files(dir) {
        let sealed = enc(dir, &f);
        if !sealed.exists() {
            continue;
        }
        let tmp = dir.join(format!("{f}.dec.tmp"));
        n += decrypt_file(key, &f, &sealed, &tmp)?;
        std::fs::rename(&tmp, dir.join(&f)).map_err(|source| AtRestError::Io { what: format!("install {f}"), source })?;
        sync_dir(dir);
        hearth_vmm::crash::point("resume.decrypted-one");
        std::fs::remove_file(&sealed).map_err(|source| AtRestError::Io { what: format!("remove {f}{SUFFIX}"), source })?;
        sync_dir(dir);
    }
    Ok(n)
}

impl Service {
    /// The ARN of the key a new microvm's files are encrypted under: the run's
    /// `kmsKeyIdentifier`, else its image version's; None when neither names one.
    ///
    /// # Errors
    ///
    /// ValidationException when it names no key of `account`.
    pub(super) async fn microvm_key(&self, account: &str, run: Option<&Value>, image: Option<&Value>) -> Result<Option<String>, ApiError> {
        let Some(ident) = run.or(image).and_then(Value::as_str) else { return Ok(None) };
        match self.kms_key_material(account, ident).await {
            Ok((arn, _)) => Ok(Some(arn)),
            Err(e) if e.kind == Kind::NotFound => {
                let shown: String = ident.chars().take(300).collect();
                Err(ApiError::validation(format!(
                    "kmsKeyIdentifier {shown:?} does not name a KMS key of this account (create one with kms create-key)"
                )))
            }
            Err(e) => Err(e),
        }
    }

    async fn microvm_key_material(&self, m: &MicrovmRecord) -> Result<Option<[u8; 32]>, ApiError> {
        match m.spec.get(KEY_FIELD).and_then(Value::as_str) {
            None => Ok(None),
            Some(arn) => Ok(Some(self.kms_key_material(&m.account, arn).await?.1)),
        }
    }

    /// After a suspend wrote `dir`: encrypts its data files when the microvm has a key.
    /// On failure the plain files stay (the encrypted ones written so far go) and the
    /// error is returned for the microvm's state reason.
    pub(super) async fn seal_suspended(&self, m: &MicrovmRecord, dir: &Path) -> Result<(), String> {
        let key = match self.microvm_key_material(m).await {
            Ok(Some(k)) => k,
            Ok(None) => return Ok(()),
            Err(e) => return Err(format!("its files are not encrypted at rest: its KMS key is unusable ({})", e.message)),
        };
        let started = std::time::Instant::now();
        let d = dir.to_path_buf();
        let why = match tokio::task::spawn_blocking(move || encrypt_dir(&key, &d)).await {
            Ok(Ok(bytes)) => {
                tracing::info!(microvm = %m.microvm_id, bytes, elapsed = ?started.elapsed(), "suspend: files encrypted at rest");
                self.metrics.observe("suspend-encrypt", started.elapsed());
                return Ok(());
            }
            Ok(Err(e)) => e.to_string(),
            Err(e) => e.to_string(),
        };
        normalize(dir, false);
        tracing::error!(microvm = %m.microvm_id, error = %why, "suspend: encryption at rest failed; the files stay plain");
        Err(format!("its suspended files could not be encrypted at rest ({why}); resume and suspend it again"))
    }

    /// Before a resume reads `dir`: decrypts its data files (a no-op when none are
    /// encrypted).
    ///
    /// # Errors
    ///
    /// Internal when the key is unusable or a file does not decrypt (the files stay as
    /// they were; the microvm stays SUSPENDED).
    pub(super) async fn unseal_suspended(&self, m: &MicrovmRecord, dir: &Path) -> Result<(), ApiError> {
        if !has_encrypted(dir) {
            return Ok(());
        }
        let key = self
            .microvm_key_material(m)
            .await?
            .ok_or_else(|| ApiError::internal(format!("microvm {}'s suspended files are encrypted but it records no key", m.microvm_id)))?;
        let started = std::time::Instant::now();
        let d = dir.to_path_buf();
        let done = tokio::task::spawn_blocking(move || {
            let r = decrypt_dir(&key, &d);
            if r.is_err() {
                // Back to encrypted: nothing stays plain that was not.
                normalize(&d, true);
                let _ = encrypt_dir(&key, &d);
            }
            r
        })
        .await
        .map_err(ApiError::internal)?;
        match done {
            Ok(bytes) => {
                tracing::info!(microvm = %m.microvm_id, bytes, elapsed = ?started.elapsed(), "resume: files decrypted");
                self.metrics.observe("resume-decrypt", started.elapsed());
                Ok(())
            }
            Err(e) => Err(ApiError::internal(format!("microvm {}'s suspended files do not decrypt: {e}", m.microvm_id))),
        }
    }

    /// Reconcile, before it settles `m`: its suspended files in plain form, so the settling
    /// reads them as a suspend left them (a failure is logged; the settling then finds the
    /// files unusable and says so).
    pub(super) async fn unseal_for_recovery(&self, m: &MicrovmRecord) {
        let dir = self.microvm_dir(&m.microvm_id).join("suspended");
        if let Err(e) = self.unseal_suspended(m, &dir).await {
            tracing::error!(microvm = %m.microvm_id, error = %e.message, "reconcile: the suspended files do not decrypt");
        }
    }

    /// Reconcile, after it settled microvm `id`: encrypted again if it is SUSPENDED.
    pub(super) async fn reseal_after_recovery(&self, account: &str, id: &str) {
        if let Ok(Some(m)) = self.store.microvm(account, id).await {
            self.reseal_if_suspended(&m, &self.microvm_dir(id).join("suspended")).await;
        }
    }

    /// After a failed resume left the microvm SUSPENDED: its files are encrypted again.
    pub(super) async fn reseal_if_suspended(&self, m: &MicrovmRecord, dir: &Path) {
        if m.state == crate::lifecycle::MicrovmState::Suspended && dir.join("manifest.json").exists() {
            if let Err(e) = self.seal_suspended(m, dir).await {
                tracing::error!(microvm = %m.microvm_id, error = %e, "could not encrypt the suspended files again");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_crash_point_settles_to_one_complete_form() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path();
        std::fs::write(dir.join("manifest.json"), br#"{"disk":"disk.qcow2"}"#).unwrap();
        std::fs::write(dir.join("state"), b"RAM-with-MARKER").unwrap();
        std::fs::write(dir.join("disk.qcow2"), b"disk-with-MARKER").unwrap();
        let k = [5u8; 32];
        encrypt_dir(&k, dir).unwrap();
        assert!(!dir.join("state").exists() && enc(dir, "state").exists() && enc(dir, "disk.qcow2").exists());
        // A crash after a decrypted file was installed, before its .enc went: both exist.
        decrypt_file(&k, "state", &enc(dir, "state"), &dir.join("state")).unwrap();
        std::fs::write(dir.join("disk.qcow2.dec.tmp"), b"partial").unwrap();
        // Rolled back to encrypted (reconcile of a SUSPENDED microvm)…
        normalize(dir, true);
        assert!(!dir.join("state").exists() && !dir.join("disk.qcow2.dec.tmp").exists());
        // …or forward to plain (a resume again).
        decrypt_dir(&k, dir).unwrap();
        assert_eq!(std::fs::read(dir.join("state")).unwrap(), b"RAM-with-MARKER");
        assert_eq!(std::fs::read(dir.join("disk.qcow2")).unwrap(), b"disk-with-MARKER");
        assert!(!has_encrypted(dir));
        // A wrong key leaves the encrypted files as they were.
        encrypt_dir(&k, dir).unwrap();
        assert!(decrypt_dir(&[6u8; 32], dir).is_err());
        normalize(dir, true);
        assert!(has_encrypted(dir) && !dir.join("state").exists());
        decrypt_dir(&k, dir).unwrap();
        assert_eq!(std::fs::read(dir.join("state")).unwrap(), b"RAM-with-MARKER");
    }
}
