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
    assert_eq!(parallel_creates(&p, &alice, 20, "tiny"), 3);

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

#[test]
fn parallel_creates_never_exceed_the_vcpu_or_memory_quota() {
    let p = Platform::start();
    let admin = p.admin();
    // Room for ten instances, but two vCPUs: two one-vCPU instances.
    let by_vcpus = api::Quota {
        instances: 10,
        vcpus: 2,
        memory_mib: 16 * 1024,
    };
    let (_, alice) = p.tenant(&admin, "few-cpus", Some(by_vcpus));
    assert_eq!(parallel_creates(&p, &alice, 8, "tiny"), 2);
    // Room for ten instances, but 512 MiB: two 256 MiB instances.
    let by_memory = api::Quota {
        instances: 10,
        vcpus: 16,
        memory_mib: 512,
    };
    let (_, bob) = p.tenant(&admin, "little-memory", Some(by_memory));
    assert_eq!(parallel_creates(&p, &bob, 8, "small"), 2);
}

/// Sends `count` creates of `flavor` at once; every refusal must be 409 `quota_exceeded`, and
/// the tenant's list must hold exactly the ones that succeeded. Returns how many did.
fn parallel_creates(p: &Platform, tenant: &Signer, count: usize, flavor: &str) -> usize {
    let results = p.block_on(async {
        let calls = (0..count).map(|i| {
            let body = api::InstanceCreate {
                tags: Default::default(),
                name: format!("vm-{i}"),
                image: "debian-12-busybox".into(),
                flavor: flavor.into(),
                subnet: None,
                security_groups: vec![],
            };
            let client = &tenant.client;
            async move {
                client
                    .post::<_, api::Instance>("/v1/instances", &body)
                    .await
            }
        });
        futures::future::join_all(calls).await
    });
    let created = results.iter().filter(|r| r.is_ok()).count();
    for r in results.into_iter().filter_map(Result::err) {
        let e = api_error(r);
        assert_eq!((e.status, e.code.as_str()), (409, "quota_exceeded"));
    }
    let list: Vec<api::Instance> = p.block_on(tenant.client.get("/v1/instances")).unwrap();
    assert_eq!(list.len(), created);
    created
}
