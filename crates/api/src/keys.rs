//! Tenants' accounts and access keys.

use crate::store::AccessKey;

fn random(n: usize) -> Vec<u8> {
    let mut b = vec![0u8; n];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        let _ = std::io::Read::read_exact(&mut f, &mut b);
    }
    b
}

/// A new 12-digit account id.
pub fn new_account() -> String {
    let n = random(8).iter().fold(0u64, |a, b| (a << 8) | *b as u64);
    format!("{:012}", n % 1_000_000_000_000)
}

/// A new access key for `account`: `HKIA` + 16 base-32 characters, and a 40-character
/// secret, like AWS keys in shape.
pub fn new_key(account: &str) -> AccessKey {
    const B32: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    const B64: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let id: String = random(16).iter().map(|b| B32[(*b % 32) as usize] as char).collect();
    let secret: String = random(40).iter().map(|b| B64[(*b % 64) as usize] as char).collect();
    AccessKey { access_key: format!("HKIA{id}"), secret, account: account.to_owned() }
}
