//! Encrypted messages, as Python's `kser-crypto` 0.1.13 writes and reads them.
//!
//! The record value is a JSON object `{"data": ..., "nonce": ...}`: `nonce` is
//! the base64 of 24 random bytes, `data` the base64 of libsodium's
//! `crypto_secretbox` (XSalsa20-Poly1305: the 16-byte MAC, then the
//! ciphertext) of the plain kser message JSON under a 32-byte key. Base64 is
//! the standard alphabet with padding; Python breaks it into lines of 76
//! characters, which reading ignores. The key is the base64 of 32 bytes in
//! `KSER_SECRETBOX_KEY`, the variable kser-crypto reads.
//!
//! A worker whose producer has a key ([`Producer::new`](crate::Producer::new)
//! takes it from `KSER_SECRETBOX_KEY`) reads plain and encrypted messages
//! alike, and publishes what its outbox holds (operation steps, retries,
//! delayed sends) encrypted. The cryptography is RustCrypto's
//! [`crypto_secretbox`]; nonces come from the operating system's CSPRNG.

use std::fmt;

use base64::Engine as _;
use base64::engine::DecodePaddingMode;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig, STANDARD};
use crypto_secretbox::aead::{Aead, AeadCore, KeyInit, OsRng};
use crypto_secretbox::{Key, Nonce, XSalsa20Poly1305};
use serde_json::Value;

/// The environment variable holding the key, as in Python kser-crypto.
pub const KEY_VARIABLE: &str = "KSER_SECRETBOX_KEY";

/// Bytes in a key.
const KEY_BYTES: usize = 32;
/// Bytes in a nonce.
const NONCE_BYTES: usize = 24;

/// Standard alphabet, padded or not (Python writes padding; a key pasted
/// without it is still the same key).
const LENIENT: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// Why a key was refused. The key itself is never part of the message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    #[error(
        "{name} is not valid base64; it must be the base64 of 32 random bytes (e.g. `openssl rand -base64 32`)"
    )]
    /// The key is not base64.
    NotBase64 {
        /// The variable holding it.
        name: &'static str,
    },
    #[error(
        "{name} decodes to {len} bytes; it must be the base64 of 32 random bytes (e.g. `openssl rand -base64 32`)"
    )]
    /// The key is not 32 bytes.
    WrongLength {
        /// The variable holding it.
        name: &'static str,
        /// How many bytes it decodes to.
        len: usize,
    },
}

/// Why an encrypted record could not be read. Says nothing of its content.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecryptError {
    /// No key is configured.
    #[error("cannot decrypt: the record is encrypted (kser-crypto) and {KEY_VARIABLE} is not set")]
    NoKey,
    /// A field of the envelope is not base64.
    #[error("cannot decrypt: field `{0}` is not valid base64")]
    NotBase64(&'static str),
    /// The nonce is not 24 bytes.
    #[error("cannot decrypt: the nonce is {0} bytes, expected 24")]
    NonceLength(usize),
    /// Authentication failed: another key, or altered bytes.
    #[error("cannot decrypt: wrong key, or the record was altered")]
    Rejected,
}

/// A secretbox key: seals messages into kser-crypto records and opens them.
///
/// Its `Debug` output hides the key.
#[derive(Clone)]
pub struct SecretBox {
    cipher: XSalsa20Poly1305,
}

impl fmt::Debug for SecretBox {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretBox(<key hidden>)")
    }
}

impl SecretBox {
    /// A box for a 32-byte key.
    pub fn new(key: [u8; KEY_BYTES]) -> Self {
        Self {
            cipher: XSalsa20Poly1305::new(&Key::from(key)),
        }
    }

    /// A box for the base64 of a 32-byte key (whitespace and line breaks
    /// ignored, padding optional).
    pub fn from_base64(key: &str) -> Result<Self, KeyError> {
        Self::parse(key, "the secretbox key")
    }

    /// The key in `KSER_SECRETBOX_KEY`, or `None` when it is unset or empty.
    pub fn from_env() -> Result<Option<Self>, KeyError> {
        match std::env::var_os(KEY_VARIABLE) {
            None => Ok(None),
            Some(value) if value.is_empty() => Ok(None),
            Some(value) => {
                let text = value
                    .to_str()
                    .ok_or(KeyError::NotBase64 { name: KEY_VARIABLE })?;
                Self::parse(text, KEY_VARIABLE).map(Some)
            }
        }
    }

    fn parse(text: &str, name: &'static str) -> Result<Self, KeyError> {
        // The decoder's own errors quote the offending byte: not passed on.
        let bytes = decode_base64(text).map_err(|()| KeyError::NotBase64 { name })?;
        let key: [u8; KEY_BYTES] =
            bytes
                .as_slice()
                .try_into()
                .map_err(|_| KeyError::WrongLength {
                    name,
                    len: bytes.len(),
                })?;
        Ok(Self::new(key))
    }

    /// Encrypts `plaintext` (a message's JSON) under a fresh random nonce
    /// into the JSON bytes of a kser-crypto record value.
    pub fn seal(&self, plaintext: &[u8]) -> Vec<u8> {
        let nonce = XSalsa20Poly1305::generate_nonce(&mut OsRng);
        // XSalsa20-Poly1305 fails only for inputs beyond 256 GiB.
        let sealed = self.cipher.encrypt(&nonce, plaintext).unwrap_or_default();
        let envelope = serde_json::json!({
            "data": STANDARD.encode(sealed),
            "nonce": STANDARD.encode(nonce),
        });
        serde_json::to_vec(&envelope).unwrap_or_default()
    }

    /// Decrypts an envelope read from a record into the plain message JSON.
    pub fn open(&self, envelope: &Envelope<'_>) -> Result<Vec<u8>, DecryptError> {
        let nonce = decode_base64(envelope.nonce).map_err(|()| DecryptError::NotBase64("nonce"))?;
        if nonce.len() != NONCE_BYTES {
            return Err(DecryptError::NonceLength(nonce.len()));
        }
        let data = decode_base64(envelope.data).map_err(|()| DecryptError::NotBase64("data"))?;
        self.cipher
            .decrypt(Nonce::from_slice(&nonce), data.as_slice())
            .map_err(|_| DecryptError::Rejected)
    }
}

/// An encrypted record's value: a JSON object with string fields `data` and
/// `nonce` and no `uuid` (which every plain kser message has).
#[derive(Debug, Clone, Copy)]
pub struct Envelope<'a> {
    data: &'a str,
    nonce: &'a str,
}

impl<'a> Envelope<'a> {
    /// The envelope in a parsed record value, if it is one.
    pub fn from_json(value: &'a Value) -> Option<Self> {
        let object = value.as_object()?;
        if object.contains_key("uuid") {
            return None;
        }
        Some(Self {
            data: object.get("data")?.as_str()?,
            nonce: object.get("nonce")?.as_str()?,
        })
    }
}

/// Whether a record value is an encrypted kser-crypto record.
pub fn is_encrypted(payload: &[u8]) -> bool {
    serde_json::from_slice::<Value>(payload)
        .ok()
        .is_some_and(|value| Envelope::from_json(&value).is_some())
}

/// Standard base64 as Python's `base64.b64decode` reads kser-crypto's
/// fields: line breaks and other whitespace skipped.
fn decode_base64(text: &str) -> Result<Vec<u8>, ()> {
    let compact: Vec<u8> = text.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
    LENIENT.decode(compact).map_err(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: [u8; 32] = [7; 32];

    fn envelope(sealed: &[u8]) -> Value {
        serde_json::from_slice(sealed).expect("an envelope is JSON")
    }

    fn open(secretbox: &SecretBox, value: &Value) -> Result<Vec<u8>, DecryptError> {
        secretbox.open(&Envelope::from_json(value).expect("an envelope"))
    }

    #[test]
    fn round_trips() {
        let secretbox = SecretBox::new(KEY);
        // '-' is not in base64's alphabet: the sealed text can never hold it.
        let plaintext = br#"{"uuid":"u","entrypoint":"e","params":{"secret":"s3-cr3t"}}"#;
        let sealed = secretbox.seal(plaintext);
        assert!(is_encrypted(&sealed));
        assert!(!is_encrypted(plaintext));
        let text = String::from_utf8(sealed.clone()).expect("UTF-8");
        assert!(!text.contains("s3-cr3t"), "{text}");
        let value = envelope(&sealed);
        let nonce = STANDARD
            .decode(value["nonce"].as_str().expect("nonce"))
            .expect("base64");
        assert_eq!(nonce.len(), 24);
        let data = STANDARD
            .decode(value["data"].as_str().expect("data"))
            .expect("base64");
        assert_eq!(data.len(), plaintext.len() + 16, "MAC then ciphertext");
        assert_eq!(open(&secretbox, &value).expect("opens"), plaintext);
        assert_ne!(
            envelope(&secretbox.seal(plaintext))["nonce"],
            value["nonce"],
            "a fresh nonce each time"
        );
    }

    /// Exactly what Python kser-crypto 0.1.13 (`CryptoSchema().encode`, with
    /// pysodium 0.7.18 on libsodium 1.0.18) wrote for this message under key
    /// `[7; 32]` and nonce `0..24`: base64 broken into lines of 76.
    const PYTHON_RECORD: &str = r#"{"data": "c3yMPsVfFtEPas66r5ujIOE8myr4AA6xx6pjcBOkJOOWmzaSENVciv0pKeGQBuZo9BgdI7ekjMRa\ncTzoPrGYw/kTMW72Ati5WCGfEUQ+64ngj9RvkjNtcpMPC4gtWEKSIi47QhxWw7fxexrOuyNx8a4T\nXzDvz/QtR6NsIcMLgGqn2XSV8jEygNXWygLfpwqzoAU5LoZxQZK9+UVvwar2L9zRM/fZuWELyVk5\nEinMiU8DXq5ajMv7VukekaaqNLoZPwrZQiKYZv+PcXjqBCeyLlTXUMrsVaFRt5lz4RvOVYyMItkw\n+h4DM8aofxn6dxi2kugprd+a/1sSO3d7kqqeIjXxUlTUGue1EuTdC5UHtOriaUM+ZoVSkcfR3EsL\nNmQqAMWqIH0f6267K/IhWv5GA8JTyKgp5MCbLsTbNe1qXl1oCg==", "nonce": "AAECAwQFBgcICQoLDA0ODxAREhMUFRYX"}"#;
    const PYTHON_PLAINTEXT: &str = r#"{"result": {"retcode": 0, "stdout": "", "uuid": "3c6577ce-04d3-469b-99c4-e7db8e2d8aa8", "stderr": "", "retval": {}}, "uuid": "3c6577ce-04d3-469b-99c4-e7db8e2d8aa8", "metadata": {}, "params": {"sides": 20, "note": "a secret that makes the box longer than one line of base64"}, "entrypoint": "dice.DiceRoll"}"#;

    #[test]
    fn reads_python_kser_crypto_records() {
        let value: Value = serde_json::from_str(PYTHON_RECORD).expect("JSON");
        assert!(value["data"].as_str().expect("data").contains('\n'));
        let opened = open(&SecretBox::new(KEY), &value).expect("opens");
        assert_eq!(String::from_utf8(opened).expect("UTF-8"), PYTHON_PLAINTEXT);
    }

    /// Sealing with the same nonce gives libsodium's bytes: MAC, then
    /// ciphertext.
    #[test]
    fn seals_as_libsodium_does() {
        let nonce: [u8; 24] = std::array::from_fn(|i| i as u8);
        let cipher = XSalsa20Poly1305::new(&Key::from(KEY));
        let sealed = cipher
            .encrypt(Nonce::from_slice(&nonce), PYTHON_PLAINTEXT.as_bytes())
            .expect("encrypts");
        let value: Value = serde_json::from_str(PYTHON_RECORD).expect("JSON");
        let python = decode_base64(value["data"].as_str().expect("data")).expect("base64");
        assert_eq!(sealed, python);
    }

    #[test]
    fn refuses_tampering_and_other_keys() {
        let secretbox = SecretBox::new(KEY);
        let sealed = envelope(&secretbox.seal(b"{\"uuid\":\"u\"}"));
        let other = SecretBox::new([8; 32]);
        assert_eq!(open(&other, &sealed), Err(DecryptError::Rejected));

        let mut data = STANDARD
            .decode(sealed["data"].as_str().expect("data"))
            .expect("base64");
        let last = data.len() - 1;
        data[last] ^= 1;
        let mut altered = sealed.clone();
        altered["data"] = Value::from(STANDARD.encode(&data));
        assert_eq!(open(&secretbox, &altered), Err(DecryptError::Rejected));

        let mut short = sealed.clone();
        short["data"] = Value::from(STANDARD.encode([1, 2, 3]));
        assert_eq!(open(&secretbox, &short), Err(DecryptError::Rejected));
        let mut bad = sealed.clone();
        bad["nonce"] = Value::from("not base64!");
        assert_eq!(
            open(&secretbox, &bad),
            Err(DecryptError::NotBase64("nonce"))
        );
        bad["nonce"] = Value::from(STANDARD.encode([0; 12]));
        assert_eq!(open(&secretbox, &bad), Err(DecryptError::NonceLength(12)));
    }

    #[test]
    fn keys_are_checked_and_never_shown() {
        let text = STANDARD.encode(KEY);
        assert!(SecretBox::from_base64(&text).is_ok());
        assert!(SecretBox::from_base64(&format!("{text}\n")).is_ok());
        assert!(SecretBox::from_base64(text.trim_end_matches('=')).is_ok());
        let short = STANDARD.encode([9; 16]);
        let err = SecretBox::from_base64(&short).unwrap_err();
        assert!(err.to_string().contains("16 bytes"), "{err}");
        assert!(!err.to_string().contains(&short));
        let err = SecretBox::from_base64("s3cr3t-key!").unwrap_err();
        assert!(err.to_string().contains("not valid base64"), "{err}");
        assert!(!err.to_string().contains("s3cr3t"), "{err}");
        let debug = format!("{:?}", SecretBox::new(KEY));
        assert!(!debug.contains(&text) && !debug.contains("7, 7"), "{debug}");
    }

    #[test]
    fn only_data_and_nonce_without_uuid_is_an_envelope() {
        let yes = serde_json::json!({"data": "a", "nonce": "b"});
        assert!(Envelope::from_json(&yes).is_some());
        for no in [
            serde_json::json!({"uuid": "u", "data": "a", "nonce": "b"}),
            serde_json::json!({"data": "a"}),
            serde_json::json!({"data": 1, "nonce": "b"}),
            serde_json::json!(["data", "nonce"]),
        ] {
            assert!(Envelope::from_json(&no).is_none(), "{no}");
        }
    }
}
