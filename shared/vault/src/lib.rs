//! `tally-vault`: personal data that can be forgotten (crypto-shredding).
//!
//! Each holder has a **data key** (256 random bits) named by a random id. A value is
//! sealed with AES-256-GCM under it ([`Vault::seal`]) into a [`Sealed`] — the key's id
//! and `nonce ‖ ciphertext ‖ tag` in base64 — which is what events, snapshots, the topic
//! and the read model carry. The data key itself is stored only **wrapped** by a master
//! key ([`KeyWrap`]: [`MasterKey`] here, from a Kubernetes Secret or an environment
//! variable; a KMS can implement the trait) in a [`KeyStore`] beside the events.
//! [`Vault::destroy`] deletes the wrapped key: from then on every copy of every value
//! sealed under it — in the store, a snapshot, a topic message, a backup — opens to
//! nothing ([`Opened::Erased`]), while everything else in those events stays readable.
//!
//! The associated data binds each ciphertext to its key id and its purpose (a holder's
//! details, a transfer reference), so a sealed value cannot be passed off as another.

use aes_gcm::aead::rand_core::RngCore;
use aes_gcm::aead::{Aead, KeyInit, OsRng, Payload};
use aes_gcm::{Aes256Gcm, Key, Nonce};
use base64::Engine;
use std::sync::Arc;
use tally_es::{KeyStore, Sealed, StoreError};

mod kept;
pub use kept::{KeptKeys, MemoryRevocations, KEPT_FOR, KEYS_KEPT};

const NONCE: usize = 12;
const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// Why the vault could not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum VaultError {
    /// The key store is out of reach.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A wrapped key or a sealed value that does not open under the keys held: tampered
    /// with, or sealed under another master key. Never the same as erased.
    #[error("corrupt sealed data: {0}")]
    Corrupt(String),
    /// The configuration is unusable (a master key of the wrong size).
    #[error("{0}")]
    Config(String),
}

/// Wraps and unwraps data keys under a master key. One trait, so a KMS (AWS KMS,
/// Vault transit) can hold the master key instead of the process.
pub trait KeyWrap: Send + Sync + 'static {
    /// `key` wrapped, bound to `key_id`.
    fn wrap(&self, key_id: &str, key: &[u8; 32]) -> Result<Vec<u8>, VaultError>;
    /// The key `wrapped` holds, if it was wrapped for `key_id` under this master key.
    fn unwrap(&self, key_id: &str, wrapped: &[u8]) -> Result<[u8; 32], VaultError>;
}

/// A master key held by the process (base64 of 32 bytes: `TALLY_MASTER_KEY`), wrapping
/// data keys with AES-256-GCM.
pub struct MasterKey(Aes256Gcm);

impl MasterKey {
    /// From base64 text of exactly 32 bytes.
    pub fn parse(text: &str) -> Result<Self, VaultError> {
        let bytes = B64
            .decode(text.trim())
            .map_err(|_| VaultError::Config("TALLY_MASTER_KEY: not base64".into()))?;
        let bytes: [u8; 32] = bytes.try_into().map_err(|b: Vec<u8>| {
            VaultError::Config(format!(
                "TALLY_MASTER_KEY: {} bytes; exactly 32 (e.g. `openssl rand -base64 32`)",
                b.len()
            ))
        })?;
        Ok(Self::from_bytes(&bytes))
    }

    /// From the key's bytes.
    pub fn from_bytes(bytes: &[u8; 32]) -> Self {
        Self(Aes256Gcm::new(Key::<Aes256Gcm>::from_slice(bytes)))
    }

    /// A new random master key, as base64 text (for a development data directory).
    pub fn generate() -> String {
        B64.encode(random::<32>())
    }
}

impl KeyWrap for MasterKey {
    fn wrap(&self, key_id: &str, key: &[u8; 32]) -> Result<Vec<u8>, VaultError> {
        seal_bytes(&self.0, &aad("data key", key_id), key)
    }

    fn unwrap(&self, key_id: &str, wrapped: &[u8]) -> Result<[u8; 32], VaultError> {
        open_bytes(&self.0, &aad("data key", key_id), wrapped)?
            .try_into()
            .map_err(|_| VaultError::Corrupt(format!("data key {key_id}: not 32 bytes")))
    }
}

/// A holder's data key, unwrapped, for sealing.
pub struct DataKey {
    id: String,
    cipher: Aes256Gcm,
}

impl DataKey {
    /// The key's id (what [`Sealed::key`] names).
    pub fn id(&self) -> &str {
        &self.id
    }
}

/// What a sealed value opened to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Opened {
    /// The plaintext.
    Plain(Vec<u8>),
    /// Its key was destroyed: the value is gone for good.
    Erased,
}

/// Seals and opens personal data; destroys keys.
#[derive(Clone)]
pub struct Vault {
    keys: Arc<dyn KeyStore>,
    wrap: Arc<dyn KeyWrap>,
}

impl Vault {
    /// Data keys kept in `keys`, wrapped by `wrap`.
    pub fn new(keys: Arc<dyn KeyStore>, wrap: Arc<dyn KeyWrap>) -> Self {
        Self { keys, wrap }
    }

    /// A new data key, stored (wrapped) before it is returned: nothing is sealed under
    /// a key that is not kept.
    pub async fn new_key(&self) -> Result<DataKey, VaultError> {
        let id = format!("k-{}", hex(&random::<16>()));
        let key = random::<32>();
        let wrapped = self.wrap.wrap(&id, &key)?;
        self.keys.put(&id, &wrapped).await?;
        Ok(DataKey {
            id,
            cipher: Aes256Gcm::new(Key::<Aes256Gcm>::from_slice(&key)),
        })
    }

    /// Key `id`, unwrapped, to seal more under it; `None` if it was destroyed.
    pub async fn key(&self, id: &str) -> Result<Option<DataKey>, VaultError> {
        check_key_id(id)?;
        let Some(wrapped) = self.keys.get(id).await? else {
            return Ok(None);
        };
        let key = self.wrap.unwrap(id, &wrapped)?;
        Ok(Some(DataKey {
            id: id.to_owned(),
            cipher: Aes256Gcm::new(Key::<Aes256Gcm>::from_slice(&key)),
        }))
    }

    /// `plaintext` sealed under `key` for `purpose` (e.g. `"holder"`).
    pub fn seal(&self, key: &DataKey, purpose: &str, plaintext: &[u8]) -> Sealed {
        let data = seal_bytes(&key.cipher, &aad(purpose, &key.id), plaintext)
            .expect("AES-GCM seals any message of this size");
        Sealed {
            key: key.id.clone(),
            data: B64.encode(data),
        }
    }

    /// Open `sealed` (sealed for `purpose`): the plaintext, or [`Opened::Erased`] if its
    /// key was destroyed.
    pub async fn open(&self, sealed: &Sealed, purpose: &str) -> Result<Opened, VaultError> {
        let Some(key) = self.key(&sealed.key).await? else {
            return Ok(Opened::Erased);
        };
        let data = B64
            .decode(&sealed.data)
            .map_err(|_| VaultError::Corrupt("sealed data is not base64".into()))?;
        open_bytes(&key.cipher, &aad(purpose, &key.id), &data).map(Opened::Plain)
    }

    /// Destroy key `key_id`: every value sealed under it is erased. Idempotent.
    pub async fn destroy(&self, key_id: &str) -> Result<(), VaultError> {
        check_key_id(key_id)?;
        Ok(self.keys.destroy(key_id).await?)
    }
}

/// A key id as [`Vault::new_key`] makes them: `k-` and 32 lowercase hex digits. Ids
/// read from events are checked before they reach a storage key.
pub fn check_key_id(id: &str) -> Result<(), VaultError> {
    let ok = id.len() == 34
        && id.starts_with("k-")
        && id[2..]
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    if ok {
        Ok(())
    } else {
        Err(VaultError::Corrupt(format!("not a key id: {id:?}")))
    }
}

fn aad(purpose: &str, key_id: &str) -> Vec<u8> {
    format!("tally\0{purpose}\0{key_id}").into_bytes()
}

fn seal_bytes(cipher: &Aes256Gcm, aad: &[u8], plaintext: &[u8]) -> Result<Vec<u8>, VaultError> {
    let nonce = random::<NONCE>();
    let mut out = nonce.to_vec();
    let sealed = cipher
        .encrypt(
            Nonce::from_slice(&nonce),
            Payload {
                msg: plaintext,
                aad,
            },
        )
        .map_err(|_| VaultError::Corrupt("could not seal".into()))?;
    out.extend(sealed);
    Ok(out)
}

fn open_bytes(cipher: &Aes256Gcm, aad: &[u8], data: &[u8]) -> Result<Vec<u8>, VaultError> {
    if data.len() < NONCE + 16 {
        return Err(VaultError::Corrupt("sealed data too short".into()));
    }
    let (nonce, sealed) = data.split_at(NONCE);
    cipher
        .decrypt(Nonce::from_slice(nonce), Payload { msg: sealed, aad })
        .map_err(|_| VaultError::Corrupt("sealed data does not open under its key".into()))
}

fn random<const N: usize>() -> [u8; N] {
    let mut bytes = [0u8; N];
    OsRng.fill_bytes(&mut bytes);
    bytes
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Keys in memory (tests).
#[derive(Default)]
pub struct MemoryKeyStore(std::sync::Mutex<std::collections::HashMap<String, Vec<u8>>>);

#[async_trait::async_trait]
impl KeyStore for MemoryKeyStore {
    async fn put(&self, id: &str, wrapped: &[u8]) -> Result<(), StoreError> {
        self.0
            .lock()
            .expect("keys")
            .insert(id.to_owned(), wrapped.to_vec());
        Ok(())
    }
    async fn get(&self, id: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.0.lock().expect("keys").get(id).cloned())
    }
    async fn destroy(&self, id: &str) -> Result<(), StoreError> {
        self.0.lock().expect("keys").remove(id);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vault() -> (Vault, Arc<MemoryKeyStore>) {
        let keys = Arc::new(MemoryKeyStore::default());
        let master = MasterKey::parse(&MasterKey::generate()).unwrap();
        (Vault::new(keys.clone(), Arc::new(master)), keys)
    }

    #[tokio::test]
    async fn a_sealed_value_opens_until_its_key_is_destroyed() {
        let (vault, keys) = vault();
        let key = vault.new_key().await.unwrap();
        let sealed = vault.seal(&key, "holder", b"Ada Lovelace");
        assert!(!sealed.data.contains("Ada"));
        assert_eq!(
            vault.open(&sealed, "holder").await.unwrap(),
            Opened::Plain(b"Ada Lovelace".to_vec())
        );
        // Bound to its purpose: not openable as something else.
        assert!(vault.open(&sealed, "reference").await.is_err());
        // The stored key is wrapped, not the key itself.
        let wrapped = keys.get(key.id()).await.unwrap().unwrap();
        assert_eq!(wrapped.len(), NONCE + 32 + 16);
        vault.destroy(key.id()).await.unwrap();
        vault.destroy(key.id()).await.unwrap();
        assert_eq!(vault.open(&sealed, "holder").await.unwrap(), Opened::Erased);
    }

    #[tokio::test]
    async fn tampering_and_another_master_key_are_corruption_not_erasure() {
        let (vault, keys) = vault();
        let key = vault.new_key().await.unwrap();
        let mut sealed = vault.seal(&key, "holder", b"ada@example.com");
        let mut bytes = B64.decode(&sealed.data).unwrap();
        bytes[NONCE] ^= 1;
        sealed.data = B64.encode(bytes);
        assert!(matches!(
            vault.open(&sealed, "holder").await,
            Err(VaultError::Corrupt(_))
        ));
        let other = Vault::new(
            keys,
            Arc::new(MasterKey::parse(&MasterKey::generate()).unwrap()),
        );
        let sealed = vault.seal(&key, "holder", b"x");
        assert!(matches!(
            other.open(&sealed, "holder").await,
            Err(VaultError::Corrupt(_))
        ));
        for bad in ["../etc/passwd", "k-XYZ", "", "k-0123"] {
            assert!(check_key_id(bad).is_err(), "{bad}");
        }
        assert!(MasterKey::parse("c2hvcnQ=").is_err());
    }
}
