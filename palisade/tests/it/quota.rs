//! Quotas hold under concurrency: the check and the insert are one atomic statement.

use palisade_common::api;

use crate::support::*;

#[test]
fn twenty_parallel_creates_against_a_quota_of_three_yield_exactly_three() {
    let p = Platform::start();
    let admin = p.admin();
    let quota = api::Quota {
        instances: 3,
        vcpus: 16,
        memory_mib: 16 * 1024,
    };
    let (_, alice) = p.tenant(&admin, "limited", Some(quota));
    let results = p.block_on(async {
        let calls = (0..20).map(|i| {
            let body = api::InstanceCreate {
                tags: Default::default(),
                name: format!("vm-{i}"),
                image: "debian-12-busybox".into(),
                flavor: "tiny".into(),
            };
            let client = &alice.client;
            async move {
                client
                    .post::<_, api::Instance>("/v1/instances", &body)
                    .await
            }
        });
        futures::future::join_all(calls).await
    });
    let created = results.iter().filter(|r| r.is_ok()).count();
    assert_eq!(created, 3, "quota of 3 let {created} through");
    for r in results.into_iter().filter_map(Result::err) {
        let e = api_error(r);
        assert_eq!((e.status, e.code.as_str()), (409, "quota_exceeded"));
    }
    let list: Vec<api::Instance> = p.block_on(alice.client.get("/v1/instances")).unwrap();
    assert_eq!(list.len(), 3);

    // The audit log agrees: three creates allowed, seventeen refused for quota — a refused
    // create is never recorded as allowed.
    let text = std::fs::read_to_string(p.audit_log()).unwrap();
    let creates: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|r| r["action"] == "instance.create")
        .collect();
    let allowed = creates.iter().filter(|r| r["result"] == "allowed").count();
    let refused = creates
        .iter()
        .filter(|r| r["result"] == "rejected" && r["code"] == "quota_exceeded")
        .count();
    assert_eq!((allowed, refused), (3, 17));
}
