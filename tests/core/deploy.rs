//! The Kubernetes manifests under `deploy/kubernetes/`: valid against the Kubernetes schemas
//! (checked offline by `kubernetes-validate` from PyPI, installed by `just test`), NATS's config
//! accepted by nats-server itself, and the settings that must agree with each other do.

use std::path::PathBuf;
use std::process::Command;

fn manifests() -> Vec<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("deploy/kubernetes");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    files
}

fn read(name: &str) -> String {
    std::fs::read_to_string(
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("deploy/kubernetes")
            .join(name),
    )
    .unwrap()
}

/// The number set for `key`: `key: N`, or an env entry `- name: key` with `value: "N"`.
fn number_after(text: &str, key: &str) -> u64 {
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .collect();
    let at = lines
        .iter()
        .position(|l| {
            l.contains(&format!("name: {key}")) || l.trim_start().starts_with(&format!("{key}:"))
        })
        .unwrap_or_else(|| panic!("{key} is set"));
    let line = if lines[at].contains("name:") {
        lines[at + 1]
    } else {
        lines[at]
    };
    let value = line.split('#').next().unwrap().rsplit(':').next().unwrap();
    value
        .trim()
        .trim_matches('"')
        .parse()
        .unwrap_or_else(|_| panic!("{key}: {line}"))
}

#[test]
fn the_manifests_are_valid_kubernetes_objects() {
    let files = manifests();
    let names: Vec<String> = files
        .iter()
        .map(|f| f.file_name().unwrap().to_string_lossy().into())
        .collect();
    for expected in [
        "deployment.yaml",
        "migrate-job.yaml",
        "nats.yaml",
        "secret.yaml",
        "statefulset.yaml",
    ] {
        assert!(
            names.iter().any(|n| n == expected),
            "{expected} in {names:?}"
        );
    }
    let out = Command::new("kubernetes-validate")
        .arg("--strict")
        .args(&files)
        .output()
        .expect("kubernetes-validate (pip install kubernetes-validate; `just test` does)");
    let report =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{report}");
    for kind in [
        "statefulset/spool",
        "deployment/spool",
        "poddisruptionbudget/spool",
        "job/spool-migrate",
        "secret/spool",
        "statefulset/nats",
    ] {
        assert!(
            report.contains(&format!("passed for resource {kind}")),
            "{kind}: {report}"
        );
    }
}

#[test]
fn executors_outlast_their_grace_period_probe_health_and_never_migrate() {
    for name in ["statefulset.yaml", "deployment.yaml"] {
        let text = read(name);
        let kill_after_s = number_after(&text, "terminationGracePeriodSeconds");
        let grace_ms = number_after(&text, "SPOOL_GRACE_PERIOD_MS");
        assert!(
            kill_after_s * 1000 > grace_ms,
            "{name}: SIGKILL comes after the grace period"
        );
        assert!(
            text.contains("path: /healthz") && text.contains("path: /readyz"),
            "{name}"
        );
        assert!(
            text.contains(r#"args: ["serve", "--no-migrate"]"#),
            "{name}"
        );
        assert!(text.contains("kind: PodDisruptionBudget"), "{name}");
        assert!(
            text.contains("key: api-token") && text.contains("key: database-url"),
            "{name}"
        );
        assert!(
            text.contains("name: SPOOL_NATS_REPLICAS") && text.contains("nats://nats:4222"),
            "{name}"
        );
    }
    assert!(
        read("statefulset.yaml").contains("fieldPath: metadata.name"),
        "stable ids from the pod name"
    );
    assert!(
        read("deployment.yaml").contains("SPOOL_TAKEOVER_AFTER_MS"),
        "a Deployment relies on takeover"
    );
    assert!(read("migrate-job.yaml").contains("key: owner-database-url"));
}

#[test]
fn the_nats_cluster_config_is_accepted_by_nats_server() {
    let text = read("nats.yaml");
    let conf: String = text
        .lines()
        .skip_while(|l| !l.contains("nats.conf: |"))
        .skip(1)
        .take_while(|l| !l.starts_with("---"))
        .map(|l| format!("{}\n", l.strip_prefix("    ").unwrap_or(l)))
        .collect();
    assert!(
        conf.contains("jetstream") && conf.matches("nats://nats-").count() == 3,
        "{conf}"
    );
    let dir = std::env::temp_dir().join(format!("spool-nats-conf-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("nats.conf");
    std::fs::write(
        &path,
        conf.replace("/data/jetstream", &dir.join("js").to_string_lossy()),
    )
    .unwrap();
    let server = std::env::var("SPOOL_TEST_NATS_SERVER").unwrap_or_else(|_| "nats-server".into());
    let out = Command::new(server)
        .arg("-c")
        .arg(&path)
        .arg("-t")
        .env("POD_NAME", "nats-0")
        .output()
        .expect("nats-server");
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
