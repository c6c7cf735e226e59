//! Secrets Manager and KMS through `Service` over a real store: the recovery window and
//! the purge after it, tenants apart, values and key material never stored in plain text.

use super::Service;
use crate::auth::Caller;
use serde_json::json;

fn service(dir: &std::path::Path) -> Service {
    let store = crate::store::Store::open(&dir.join("hearth.db")).unwrap();
    let token_key = crate::ingress::TokenKey::load_or_create(dir).unwrap();
    let vm = hearth_vmm::VmConfig::new("/nonexistent/vmlinuz", "/nonexistent/initramfs");
    Service::new(store, dir.into(), dir.into(), vm, token_key)
}

#[tokio::test(flavor = "multi_thread")]
async fn secrets_keep_their_window_stay_apart_and_are_sealed() {
    let dir = tempfile::tempdir().unwrap();
    let svc = service(dir.path());
    let a = Caller::root("111111111111", "HKIAA");
    let b = Caller::root("222222222222", "HKIAB");
    let key = svc.kms_call(&a, "CreateKey", &json!({})).await.unwrap()["KeyMetadata"].clone();
    let made =
        svc.secrets_call(&a, "CreateSecret", &json!({ "Name": "db", "SecretString": "pa55-word", "KmsKeyId": key["Arn"] })).await.unwrap();
    let arn = made["ARN"].as_str().unwrap().to_owned();
    let get = json!({ "SecretId": arn });
    assert_eq!(svc.secrets_call(&a, "GetSecretValue", &get).await.unwrap()["SecretString"], "pa55-word");
    assert_eq!(svc.secrets_call(&b, "GetSecretValue", &get).await.unwrap_err().code, "ResourceNotFoundException");
    assert_eq!(svc.secrets_call(&b, "GetSecretValue", &json!({ "SecretId": "db" })).await.unwrap_err().code, "ResourceNotFoundException");
    // Stored: the value and the key's material only sealed.
    let doc = svc.store.doc("secret", "111111111111", "db").await.unwrap().unwrap();
    assert!(!doc.contains("pa55-word"), "{doc}");
    let e = svc.kms_key_material("111111111111", "alias/none").await.unwrap_err();
    assert_eq!(e.kind, crate::error::Kind::NotFound);
    let (key_arn, material) = svc.kms_key_material("111111111111", key["KeyId"].as_str().unwrap()).await.unwrap();
    assert_eq!(key_arn, key["Arn"].as_str().unwrap());
    let stored = svc.store.doc("kms-key", "111111111111", key["KeyId"].as_str().unwrap()).await.unwrap().unwrap();
    let b64 = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, material);
    assert!(!stored.contains(&b64), "the key's material is sealed");
    assert!(svc.kms_key_material("222222222222", &key_arn).await.is_err(), "another account's key");
    // Deleted with a window: refused, restorable; past its window: purged.
    let del = svc.secrets_call(&a, "DeleteSecret", &json!({ "SecretId": "db", "RecoveryWindowInDays": 7 })).await.unwrap();
    assert!(del["DeletionDate"].as_f64().unwrap() > crate::clock::now() + 6.9 * 86_400.0);
    assert_eq!(svc.secrets_call(&a, "GetSecretValue", &get).await.unwrap_err().code, "InvalidRequestException");
    svc.secrets_call(&a, "RestoreSecret", &get).await.unwrap();
    assert_eq!(svc.secrets_call(&a, "GetSecretValue", &get).await.unwrap()["SecretString"], "pa55-word");
    svc.secrets_call(&a, "DeleteSecret", &json!({ "SecretId": "db", "RecoveryWindowInDays": 7 })).await.unwrap();
    let mut d: serde_json::Value = serde_json::from_str(&svc.store.doc("secret", "111111111111", "db").await.unwrap().unwrap()).unwrap();
    d["deletion"] = json!(crate::clock::now() - 1.0);
    svc.store.put_doc("secret", "111111111111", "db", &d.to_string(), false).await.unwrap();
    assert_eq!(svc.secrets_call(&a, "DescribeSecret", &get).await.unwrap_err().code, "ResourceNotFoundException");
    assert!(svc.store.doc("secret", "111111111111", "db").await.unwrap().is_none(), "purged");
    // The name is free again.
    svc.secrets_call(&a, "CreateSecret", &json!({ "Name": "db", "SecretString": "x" })).await.unwrap();
    assert_eq!(svc.secrets_call(&a, "Nope", &json!({})).await.unwrap_err().code, "UnknownOperationException");
}
