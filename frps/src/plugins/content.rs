//! What each operation sends as `content`, with frp's field names.
//!
//! Every field is always sent (fields that do not apply to frpx are empty),
//! and a plugin's modified content may leave any of them out or set them to
//! `null` (as Go plugins do for empty maps): those read as empty.

use std::collections::BTreeMap;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize};

use super::Op;

/// Content of one operation.
pub trait Content: Serialize + DeserializeOwned + Send + Sync + 'static {
    /// The operation this content belongs to.
    const OP: Op;
}

/// Reads `null` as the default value.
fn nullable<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Option::<T>::deserialize(d).map(Option::unwrap_or_default)
}

/// A field frps sends empty (`T`'s default) and takes nothing from: a
/// plugin's modified content may set it in any form (frp's plugin
/// documentation has `locations` as a string, frp itself a list), and the
/// value it set is what the next plugin in the chain is sent, as under frp
/// (an enriching plugin setting `group` for a policy plugin after it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Passed<T> {
    /// What a plugin set, if one did.
    set: Option<serde_json::Value>,
    empty: std::marker::PhantomData<T>,
}

impl<T> Default for Passed<T> {
    fn default() -> Self {
        Passed {
            set: None,
            empty: std::marker::PhantomData,
        }
    }
}

impl<T: Default + Serialize> Serialize for Passed<T> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match &self.set {
            Some(value) => value.serialize(s),
            None => T::default().serialize(s),
        }
    }
}

impl<'de, T> Deserialize<'de> for Passed<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // `null` (a Go plugin's empty map or slice) is empty, as sent.
        let value = serde_json::Value::deserialize(d)?;
        Ok(Passed {
            set: (!value.is_null()).then_some(value),
            empty: std::marker::PhantomData,
        })
    }
}

/// Metadata, string to string.
pub type Metas = BTreeMap<String, String>;

/// Who a client is, as every operation but `Login` carries it under `user`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserInfo {
    /// frpc's `--user` (empty when not given).
    #[serde(default, deserialize_with = "nullable")]
    pub user: String,
    /// frpc's `--meta` entries.
    #[serde(default, deserialize_with = "nullable")]
    pub metas: Metas,
    /// The control session's id.
    #[serde(default, deserialize_with = "nullable")]
    pub run_id: String,
}

/// `Login`: a client logged in and asks to register.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoginContent {
    /// frpc version.
    #[serde(default, deserialize_with = "nullable")]
    pub version: String,
    /// Host name of the GPU box.
    #[serde(default, deserialize_with = "nullable")]
    pub hostname: String,
    /// Its operating system.
    #[serde(default, deserialize_with = "nullable")]
    pub os: String,
    /// Its CPU architecture.
    #[serde(default, deserialize_with = "nullable")]
    pub arch: String,
    /// frpc's `--user`.
    #[serde(default, deserialize_with = "nullable")]
    pub user: String,
    /// Unix time (seconds) at frps when the call was made.
    #[serde(default, deserialize_with = "nullable")]
    pub timestamp: i64,
    /// Always empty: frpx authenticates with accounts, not frp's token.
    #[serde(default, deserialize_with = "nullable")]
    pub privilege_key: String,
    /// The control session's id.
    #[serde(default, deserialize_with = "nullable")]
    pub run_id: String,
    /// Always 0: frpx dials data connections back on demand, keeping no pool.
    #[serde(default, deserialize_with = "nullable")]
    pub pool_count: i64,
    /// frpc's `--meta` entries.
    #[serde(default, deserialize_with = "nullable")]
    pub metas: Metas,
    /// `ip:port` of the control connection's peer.
    #[serde(default, deserialize_with = "nullable")]
    pub client_address: String,
}

impl Content for LoginContent {
    const OP: Op = Op::Login;
}

/// `NewProxy`: a client registers the service it exposes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewProxyContent {
    /// The client.
    #[serde(default, deserialize_with = "nullable")]
    pub user: UserInfo,
    /// The client id.
    #[serde(default, deserialize_with = "nullable")]
    pub proxy_name: String,
    /// Always `http`.
    #[serde(default, deserialize_with = "nullable")]
    pub proxy_type: String,
    /// Always false (frpx has no per-proxy encryption).
    #[serde(default)]
    pub use_encryption: Passed<bool>,
    /// Always false.
    #[serde(default)]
    pub use_compression: Passed<bool>,
    /// Empty: every client is in one load-balanced pool.
    #[serde(default)]
    pub group: Passed<String>,
    /// Empty.
    #[serde(default)]
    pub group_key: Passed<String>,
    /// 0 (tcp and udp only).
    #[serde(default)]
    pub remote_port: Passed<i64>,
    /// Empty: frpx routes by API key, not by host name.
    #[serde(default)]
    pub custom_domains: Passed<Vec<String>>,
    /// Empty.
    #[serde(default)]
    pub subdomain: Passed<String>,
    /// Empty.
    #[serde(default)]
    pub locations: Passed<Vec<String>>,
    /// Empty.
    #[serde(default)]
    pub http_user: Passed<String>,
    /// Empty.
    #[serde(default)]
    pub http_pwd: Passed<String>,
    /// Empty.
    #[serde(default)]
    pub host_header_rewrite: Passed<String>,
    /// Empty.
    #[serde(default)]
    pub headers: Passed<Metas>,
    /// Empty (stcp only).
    #[serde(default)]
    pub sk: Passed<String>,
    /// Empty (tcpmux only).
    #[serde(default)]
    pub multiplexer: Passed<String>,
    /// frpc's `--proxy-meta` entries.
    #[serde(default, deserialize_with = "nullable")]
    pub metas: Metas,
}

impl Content for NewProxyContent {
    const OP: Op = Op::NewProxy;
}

/// `CloseProxy`: a registered client went away (notification only).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CloseProxyContent {
    /// The client.
    #[serde(default, deserialize_with = "nullable")]
    pub user: UserInfo,
    /// The client id.
    #[serde(default, deserialize_with = "nullable")]
    pub proxy_name: String,
}

impl Content for CloseProxyContent {
    const OP: Op = Op::CloseProxy;
}

/// `Ping`: a heartbeat from a registered client.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PingContent {
    /// The client.
    #[serde(default, deserialize_with = "nullable")]
    pub user: UserInfo,
    /// Unix time (seconds) at frps.
    #[serde(default, deserialize_with = "nullable")]
    pub timestamp: i64,
    /// Always empty.
    #[serde(default, deserialize_with = "nullable")]
    pub privilege_key: String,
}

impl Content for PingContent {
    const OP: Op = Op::Ping;
}

/// `NewWorkConn`: a client dialed back a data connection.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewWorkConnContent {
    /// The client.
    #[serde(default, deserialize_with = "nullable")]
    pub user: UserInfo,
    /// The control session's id.
    #[serde(default, deserialize_with = "nullable")]
    pub run_id: String,
    /// Unix time (seconds) at frps.
    #[serde(default, deserialize_with = "nullable")]
    pub timestamp: i64,
    /// Always empty.
    #[serde(default, deserialize_with = "nullable")]
    pub privilege_key: String,
}

impl Content for NewWorkConnContent {
    const OP: Op = Op::NewWorkConn;
}

/// `NewUserConn`: an authenticated public request is about to go to a client.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewUserConnContent {
    /// The client chosen to serve it.
    #[serde(default, deserialize_with = "nullable")]
    pub user: UserInfo,
    /// That client's id.
    #[serde(default, deserialize_with = "nullable")]
    pub proxy_name: String,
    /// Always `http`.
    #[serde(default, deserialize_with = "nullable")]
    pub proxy_type: String,
    /// `ip:port` of the public caller.
    #[serde(default, deserialize_with = "nullable")]
    pub remote_addr: String,
}

impl Content for NewUserConnContent {
    const OP: Op = Op::NewUserConn;
}

/// Fields holding a structure of their own (frp's `UserInfo`); the other
/// objects are maps (`metas`, `headers`), whose keys are data.
const STRUCT_FIELDS: &[&str] = &["user"];

/// Renames the keys of a plugin's modified content to the field names of
/// the content frps `sent`, where they differ only as Go's `encoding/json`
/// lets them (`User`, `PROXY_NAME`; see [`super::client::go_fold`]): frp
/// reads modified content into its structs that way. A key written exactly
/// wins over its other spellings; of several other spellings, the first in
/// sorted order (the object's order is not kept). Map keys stay as written.
pub fn go_names(value: &mut serde_json::Value, sent: &serde_json::Value) {
    let (serde_json::Value::Object(map), serde_json::Value::Object(fields)) = (value, sent) else {
        return;
    };
    let spelled: Vec<String> = map
        .keys()
        .filter(|k| !fields.contains_key(k.as_str()))
        .cloned()
        .collect();
    for key in spelled {
        let folded = super::client::go_fold(&key);
        let Some(field) = fields.keys().find(|f| super::client::go_fold(f) == folded) else {
            continue;
        };
        let v = map.remove(&key).expect("listed");
        map.entry(field.clone()).or_insert(v);
    }
    for field in STRUCT_FIELDS {
        if let (Some(inner), Some(sent_inner)) = (map.get_mut(*field), fields.get(*field)) {
            go_names(inner, sent_inner);
        }
    }
}

/// Seconds since the Unix epoch, now.
pub fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn keys(v: &serde_json::Value) -> Vec<&str> {
        let mut k: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
        k.sort();
        k
    }

    #[test]
    fn content_keys_take_the_field_names_as_go_reads_them() {
        let sent = serde_json::to_value(NewProxyContent {
            user: UserInfo {
                user: "u".into(),
                metas: [("Region".to_owned(), "eu".to_owned())].into(),
                run_id: "r".into(),
            },
            proxy_name: "gpu-a".into(),
            ..Default::default()
        })
        .unwrap();
        let mut answer = json!({
            "User": {"USER": "bob", "Metas": {"region": "us"}, "run_id": "r"},
            "Proxy_Name": "other",
            "proxy_name": "gpu-b",
            "Metas": {"Tier": "1"},
            "unknown_field": 1,
        });
        go_names(&mut answer, &sent);
        let c: NewProxyContent = serde_json::from_value(answer).unwrap();
        assert_eq!(c.user.user, "bob");
        // Map keys are data: not renamed after the keys sent.
        assert_eq!(
            c.user.metas,
            [("region".to_owned(), "us".to_owned())].into()
        );
        assert_eq!(c.metas, [("Tier".to_owned(), "1".to_owned())].into());
        // The exact spelling wins over another.
        assert_eq!(c.proxy_name, "gpu-b");
        // Login's `user` is a string, not a structure.
        let sent = serde_json::to_value(LoginContent::default()).unwrap();
        let mut answer = json!({"User": "carol", "Metas": null});
        go_names(&mut answer, &sent);
        let c: LoginContent = serde_json::from_value(answer).unwrap();
        assert_eq!(c.user, "carol");
    }

    #[test]
    fn every_frp_field_is_sent_even_when_empty() {
        let v = serde_json::to_value(NewProxyContent::default()).unwrap();
        assert_eq!(v["custom_domains"], json!([]));
        assert_eq!(v["headers"], json!({}));
        assert_eq!(
            keys(&v).len(),
            18,
            "the seed's NewProxy fields: {:?}",
            keys(&v)
        );
        let v = serde_json::to_value(LoginContent::default()).unwrap();
        assert_eq!(
            keys(&v),
            [
                "arch",
                "client_address",
                "hostname",
                "metas",
                "os",
                "pool_count",
                "privilege_key",
                "run_id",
                "timestamp",
                "user",
                "version"
            ]
        );
    }

    #[test]
    fn null_and_missing_fields_read_as_empty() {
        let c: NewProxyContent = serde_json::from_value(json!({
            "user": {"user": "u", "metas": null},
            "proxy_name": "renamed",
            "metas": null,
            "custom_domains": null
        }))
        .unwrap();
        assert_eq!(c.proxy_name, "renamed");
        assert_eq!(c.user.user, "u");
        assert!(c.metas.is_empty() && c.user.metas.is_empty());
        assert!(serde_json::from_value::<LoginContent>(json!({"timestamp": "soon"})).is_err());
    }

    #[test]
    fn fields_frps_takes_nothing_from_may_come_back_in_any_form() {
        // As frp's plugin documentation shows `locations` (a string), and
        // other shapes a plugin might echo.
        let c: NewProxyContent = serde_json::from_value(json!({
            "proxy_name": "gpu-1",
            "locations": "",
            "custom_domains": "a.example",
            "remote_port": "8080",
            "use_encryption": "yes",
            "headers": [],
            "metas": {"k": "v"}
        }))
        .unwrap();
        assert_eq!(c.proxy_name, "gpu-1");
        assert_eq!(c.metas["k"], "v");
        // Sent on as set, to the next plugin.
        let sent = serde_json::to_value(&c).unwrap();
        assert_eq!(sent["locations"], "");
        assert_eq!(sent["custom_domains"], "a.example");
        assert_eq!(sent["remote_port"], "8080");
        assert_eq!(sent["use_encryption"], "yes");
        assert_eq!(sent["headers"], json!([]));
        // What no plugin set, or set to null, goes as frps sends it: empty.
        assert_eq!(sent["group"], "");
        assert_eq!(sent["subdomain"], "");
        let c: NewProxyContent =
            serde_json::from_value(json!({"proxy_name": "a", "custom_domains": null})).unwrap();
        let sent = serde_json::to_value(&c).unwrap();
        assert_eq!(
            (&sent["custom_domains"], &sent["remote_port"]),
            (&json!([]), &json!(0))
        );
        // What frps does take is still checked.
        let wrong = json!({"proxy_name": 7});
        assert!(serde_json::from_value::<NewProxyContent>(wrong).is_err());
        let wrong = json!({"proxy_name": "a", "metas": {"k": 1}});
        assert!(serde_json::from_value::<NewProxyContent>(wrong).is_err());
    }
}
