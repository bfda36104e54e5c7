//! Audit records as OCSF 1.1 events, for third-party audit systems (SIEMs): Authentication
//! (class 3002) for logins, keys and signatures; API Activity (class 6003) for every other
//! request and for host operations and events. What has no OCSF attribute (the record type,
//! the provider mark, the leaf hash) is kept under `unmapped`, so an event can be traced back
//! to the record it came from and that record proved in the log.

use serde_json::{json, Value};

use crate::audit::{AuditRecord, TYPE_AUTHENTICATION};

pub const OCSF_VERSION: &str = "1.1.0";

const SUCCESS: &[&str] = &["allowed", "succeeded", "observed", "requested"];

/// OCSF API Activity's activity from an action's verb.
fn api_activity(action: &str) -> (u32, &'static str) {
    let verb = action.rsplit(['.', '_']).next().unwrap_or("");
    match verb {
        "create" | "register" => (1, "Create"),
        "list" | "show" | "read" | "get" | "whoami" | "heads" | "inclusion" | "consistency"
        | "console" | "export" => (2, "Read"),
        "delete" | "erase" | "revoke" => (4, "Delete"),
        _ => (3, "Update"),
    }
}

fn epoch_millis(time: &str) -> i64 {
    time::OffsetDateTime::parse(time, &time::format_description::well_known::Rfc3339)
        .map(|t| (t.unix_timestamp_nanos() / 1_000_000) as i64)
        .unwrap_or(0)
}

fn endpoint(source: &str) -> Value {
    match source.rsplit_once(':') {
        Some((ip, port)) if port.parse::<u16>().is_ok() && !ip.starts_with("host") => {
            json!({"ip": ip.trim_matches(['[', ']']), "port": port.parse::<u16>().unwrap_or(0)})
        }
        _ => json!({"hostname": source}),
    }
}

/// The OCSF event for one audit record.
pub fn event(record: &AuditRecord) -> Value {
    let success = SUCCESS.contains(&record.result.as_str());
    let (class_uid, class_name, category_uid, category_name, activity_id, activity_name) =
        if record.kind == TYPE_AUTHENTICATION {
            let (id, name) = if record.action == "auth.login" || record.action == "key.create" {
                (1, "Logon")
            } else {
                (99, "Other")
            };
            (
                3002,
                "Authentication",
                3,
                "Identity & Access Management",
                id,
                name,
            )
        } else {
            let (id, name) = api_activity(&record.action);
            (6003, "API Activity", 6, "Application Activity", id, name)
        };
    let mut event = json!({
        "class_uid": class_uid,
        "class_name": class_name,
        "category_uid": category_uid,
        "category_name": category_name,
        "activity_id": activity_id,
        "activity_name": activity_name,
        "type_uid": class_uid * 100 + activity_id,
        "time": epoch_millis(&record.time),
        "severity_id": if success { 1 } else { 2 },
        "status": if success { "Success" } else { "Failure" },
        "status_id": if success { 1 } else { 2 },
        "status_detail": record.result,
        "message": format!("{} {}: {}", record.action, record.object, record.result),
        "metadata": {
            "version": OCSF_VERSION,
            "product": {"name": "Palisade", "vendor_name": "Palisade"},
            "log_name": "audit",
            "sequence": record.seq,
            "uid": format!("palisade-audit-{}", record.seq),
            "correlation_uid": record.request_id,
        },
        "actor": {"user": {"uid": record.subject}},
        "src_endpoint": endpoint(&record.source),
        "api": {"operation": record.action, "request": {"uid": record.request_id}},
        "resources": [{"uid": record.object}],
        "unmapped": {
            "palisade_type": record.kind,
            "provider_action": record.provider,
            "leaf_hash": record.hash,
        },
    });
    if let Some(code) = &record.code {
        event["status_code"] = json!(code);
    }
    if let Some(role) = &record.role {
        event["actor"]["user"]["type"] = json!(role);
    }
    if let Some(key) = &record.key_id {
        event["actor"]["session"] = json!({"uid": key});
    }
    if let Some(tenant) = &record.tenant_id {
        event["cloud"] = json!({"provider": "Palisade", "account": {"uid": tenant}});
    }
    if class_uid == 3002 {
        event["user"] = json!({"uid": record.subject});
    }
    event
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(kind: &str, action: &str, result: &str) -> AuditRecord {
        AuditRecord {
            seq: 7,
            time: "2026-12-04T10:00:00.250Z".into(),
            kind: kind.into(),
            request_id: "r-1".into(),
            source: "192.0.2.1:4242".into(),
            subject: "user:u1".into(),
            role: Some("member".into()),
            key_id: Some("key-1".into()),
            tenant_id: Some("t1".into()),
            provider: false,
            action: action.into(),
            object: "instance/i1".into(),
            result: result.into(),
            code: None,
            hash: "ab".into(),
        }
    }

    #[test]
    fn records_map_to_their_classes_and_activities() {
        let e = event(&record("read", "instance.list", "allowed"));
        assert_eq!(
            (
                e["class_uid"].as_u64(),
                e["activity_id"].as_u64(),
                e["type_uid"].as_u64()
            ),
            (Some(6003), Some(2), Some(600302))
        );
        assert_eq!(e["time"], 1_796_378_400_250i64);
        assert_eq!(e["src_endpoint"]["ip"], "192.0.2.1");
        assert_eq!(e["cloud"]["account"]["uid"], "t1");
        assert_eq!(e["metadata"]["sequence"], 7);
        let e = event(&record("mutation", "instance.delete", "denied"));
        assert_eq!(
            (e["activity_id"].as_u64(), e["status_id"].as_u64()),
            (Some(4), Some(2))
        );
        let e = event(&record("authentication", "auth.login", "denied"));
        assert_eq!(
            (
                e["class_uid"].as_u64(),
                e["activity_id"].as_u64(),
                e["status"].as_str()
            ),
            (Some(3002), Some(1), Some("Failure"))
        );
        let mut host = record("host", "host.instance_start", "requested");
        host.source = "host:local".into();
        let e = event(&host);
        assert_eq!(e["src_endpoint"]["hostname"], "host:local");
        assert_eq!(e["unmapped"]["palisade_type"], "host");
    }
}
