//! [`MetadataStore`] for the SQLite [`Store`]: each trait method runs the inherent
//! synchronous call ([`super::sqlite`]) through [`done`], which hands the worker's other
//! tasks to another thread while it waits (`block_in_place`) and returns a ready future.

use super::sqlite::{DbResult, Store};
use super::{AccessKey, ImageRecord, MetadataStore, Meter, MicrovmRecord, StoreFuture, Usage, VersionRecord};

/// Runs `call` and returns its result as a future that is ready at once: inside
/// `block_in_place` on a multi-threaded runtime (see the module's doc), else inline.
fn done<'a, T: Send + 'a>(call: impl FnOnce() -> DbResult<T>) -> StoreFuture<'a, T> {
    let r = match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(call),
        _ => call(),
    };
    Box::pin(std::future::ready(r.map_err(Into::into)))
}

impl MetadataStore for Store {
    fn key<'a>(&'a self, access_key: &'a str) -> StoreFuture<'a, Option<AccessKey>> {
        done(|| Store::key(self, access_key))
    }
    fn put_doc<'a>(&'a self, kind: &'a str, account: &'a str, name: &'a str, doc: &'a str, create_only: bool) -> StoreFuture<'a, bool> {
        done(|| Store::put_doc(self, kind, account, name, doc, create_only))
    }
    fn doc<'a>(&'a self, kind: &'a str, account: &'a str, name: &'a str) -> StoreFuture<'a, Option<String>> {
        done(|| Store::doc(self, kind, account, name))
    }
    fn docs<'a>(&'a self, kind: &'a str, account: &'a str, prefix: &'a str) -> StoreFuture<'a, Vec<(String, String)>> {
        done(|| Store::docs(self, kind, account, prefix))
    }
    fn delete_doc<'a>(&'a self, kind: &'a str, account: &'a str, name: &'a str) -> StoreFuture<'a, bool> {
        done(|| Store::delete_doc(self, kind, account, name))
    }
    fn has_keys(&self) -> StoreFuture<'_, bool> {
        done(|| Store::has_keys(self))
    }
    fn add_key<'a>(&'a self, k: &'a AccessKey) -> StoreFuture<'a, ()> {
        done(|| Store::add_key(self, k))
    }
    fn account_settings<'a>(&'a self, account: &'a str) -> StoreFuture<'a, super::AccountSettings> {
        done(|| Store::account_settings(self, account))
    }
    fn put_microvm<'a>(&'a self, m: &'a MicrovmRecord) -> StoreFuture<'a, ()> {
        done(|| Store::put_microvm(self, m))
    }
    fn put_microvm_metered<'a>(&'a self, m: &'a MicrovmRecord, meter: Meter, now: f64) -> StoreFuture<'a, ()> {
        done(|| Store::put_microvm_metered(self, m, meter, now))
    }
    fn touch<'a>(&'a self, id: &'a str, t: f64) -> StoreFuture<'a, ()> {
        done(|| Store::touch(self, id, t))
    }
    fn set_spec_field<'a>(&'a self, id: &'a str, key: &'a str, value: &'a serde_json::Value) -> StoreFuture<'a, ()> {
        done(|| Store::set_spec_field(self, id, key, value))
    }
    fn microvm<'a>(&'a self, account: &'a str, id: &'a str) -> StoreFuture<'a, Option<MicrovmRecord>> {
        done(|| Store::microvm(self, account, id))
    }
    fn list_microvms<'a>(&'a self, account: &'a str, after: i64, limit: usize) -> StoreFuture<'a, Vec<(i64, MicrovmRecord)>> {
        done(|| Store::list_microvms(self, account, after, limit))
    }
    fn put_connector<'a>(&'a self, c: &'a super::ConnectorRecord) -> StoreFuture<'a, ()> {
        done(|| Store::put_connector(self, c))
    }
    fn connector<'a>(&'a self, account: &'a str, name: &'a str) -> StoreFuture<'a, Option<super::ConnectorRecord>> {
        done(|| Store::connector(self, account, name))
    }
    fn connectors<'a>(&'a self, account: Option<&'a str>) -> StoreFuture<'a, Vec<super::ConnectorRecord>> {
        done(|| Store::connectors(self, account))
    }
    fn delete_connector<'a>(&'a self, account: &'a str, name: &'a str) -> StoreFuture<'a, bool> {
        done(|| Store::delete_connector(self, account, name))
    }
    fn live_microvms(&self) -> StoreFuture<'_, Vec<MicrovmRecord>> {
        done(|| Store::live_microvms(self))
    }
    fn count_by_state(&self) -> StoreFuture<'_, Vec<(String, i64)>> {
        done(|| Store::count_by_state(self))
    }
    fn put_image<'a>(&'a self, i: &'a ImageRecord) -> StoreFuture<'a, ()> {
        done(|| Store::put_image(self, i))
    }
    fn image<'a>(&'a self, account: &'a str, name: &'a str) -> StoreFuture<'a, Option<ImageRecord>> {
        done(|| Store::image(self, account, name))
    }
    fn images<'a>(&'a self, account: &'a str) -> StoreFuture<'a, Vec<ImageRecord>> {
        done(|| Store::images(self, account))
    }
    fn delete_image<'a>(&'a self, account: &'a str, name: &'a str) -> StoreFuture<'a, ()> {
        done(|| Store::delete_image(self, account, name))
    }
    fn put_version<'a>(&'a self, v: &'a VersionRecord) -> StoreFuture<'a, ()> {
        done(|| Store::put_version(self, v))
    }
    fn versions<'a>(&'a self, account: &'a str, name: &'a str) -> StoreFuture<'a, Vec<VersionRecord>> {
        done(|| Store::versions(self, account, name))
    }
    fn unfinished_versions(&self) -> StoreFuture<'_, Vec<VersionRecord>> {
        done(|| Store::unfinished_versions(self))
    }
    fn delete_version<'a>(&'a self, account: &'a str, name: &'a str, version: u32) -> StoreFuture<'a, ()> {
        done(|| Store::delete_version(self, account, name, version))
    }
    fn tags<'a>(&'a self, arn: &'a str) -> StoreFuture<'a, Vec<(String, String)>> {
        done(|| Store::tags(self, arn))
    }
    fn tag<'a>(&'a self, arn: &'a str, tags: &'a [(String, String)]) -> StoreFuture<'a, ()> {
        done(|| Store::tag(self, arn, tags))
    }
    fn untag<'a>(&'a self, arn: &'a str, keys: &'a [String]) -> StoreFuture<'a, ()> {
        done(|| Store::untag(self, arn, keys))
    }
    fn claim<'a>(&'a self, account: &'a str, op: &'a str, token: &'a str, hash: &'a str) -> StoreFuture<'a, Option<(String, String)>> {
        done(|| Store::claim(self, account, op, token, hash))
    }
    fn unclaim<'a>(&'a self, account: &'a str, op: &'a str, token: &'a str) -> StoreFuture<'a, ()> {
        done(|| Store::unclaim(self, account, op, token))
    }
    fn remember<'a>(&'a self, account: &'a str, op: &'a str, token: &'a str, hash: &'a str, response: &'a str) -> StoreFuture<'a, ()> {
        done(|| Store::remember(self, account, op, token, hash, response))
    }
    fn usage<'a>(&'a self, account: &'a str, from: f64, to: f64, now: f64) -> StoreFuture<'a, Usage> {
        done(|| Store::usage(self, account, from, to, now))
    }
}
