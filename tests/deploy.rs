//! deploy/ against a real API server (tests/common/k8s.rs, no controller manager needed):
//! each mode's kustomization applies as it is and through an overlay that moves it to
//! another namespace, where every namespaced object then lives (and nothing in the default
//! one); its StorageClass is one Palisade's parameter parser and csi-provisioner accept; its
//! examples apply; and its ServiceAccounts can do what the code and the sidecars call, and
//! nothing broad (SubjectAccessReviews, as `kubectl auth can-i --as=system:serviceaccount:
//! NS:SA` makes them, see [`can`]).
//!
//! Without `KUBEBUILDER_ASSETS` every test prints a SKIPPED line and passes.

mod common;

use std::collections::{BTreeSet, HashMap};
use std::path::{Component, Path, PathBuf};

use common::k8s::ControlPlane;
use serde_json::Value;

/// The namespace the kustomizations name.
const DEFAULT_NAMESPACE: &str = "palisade-system";
/// The namespace the overlays move the install to.
const OVERLAY_NAMESPACE: &str = "storage-test";

fn deploy_dir(mode: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("deploy")
        .join(mode)
}

/// A kustomization in a temporary directory with `namespace:` and the mode's directory as
/// its only resource (by a relative path: kustomize refuses absolute ones).
fn overlay(mode: &str, namespace: &str) -> tempfile::TempDir {
    let dir = tempfile::Builder::new()
        .prefix("palisade-overlay-")
        .tempdir()
        .expect("a temporary directory");
    let base = relative_to(&deploy_dir(mode), dir.path());
    std::fs::write(
        dir.path().join("kustomization.yaml"),
        format!(
            "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n\
             namespace: {namespace}\nresources:\n  - {}\n",
            base.display()
        ),
    )
    .expect("write the overlay");
    dir
}

/// `path` relative to `from`, both absolute.
fn relative_to(path: &Path, from: &Path) -> PathBuf {
    let ups = from
        .components()
        .filter(|c| matches!(c, Component::Normal(_)))
        .count();
    let mut relative: PathBuf = std::iter::repeat_n("..", ups).collect();
    relative.extend(
        path.components()
            .filter(|c| matches!(c, Component::Normal(_))),
    );
    relative
}

fn json(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

/// The kinds the API server serves cluster-scoped.
fn cluster_scoped_kinds(plane: &ControlPlane) -> BTreeSet<String> {
    plane
        .kubectl_ok(&["api-resources", "--namespaced=false", "--no-headers"])
        .lines()
        .filter_map(|l| l.split_whitespace().last().map(str::to_string))
        .collect()
}

/// Applies a kustomization, then checks that every object of it is on the server, each
/// namespaced one in `namespace`; returns the objects.
fn apply_in(plane: &ControlPlane, kustomization: &Path, namespace: &str) -> Vec<Value> {
    let dir = kustomization.display().to_string();
    plane.kubectl_ok(&["apply", "-k", &dir]);
    let cluster_scoped = cluster_scoped_kinds(plane);
    let listed = json(&plane.kubectl_ok(&["get", "-k", &dir, "-o", "json"]));
    let items = listed["items"].as_array().expect("items").clone();
    let mut namespaced = 0;
    for item in &items {
        let kind = item["kind"].as_str().expect("a kind");
        let name = item["metadata"]["name"].as_str().expect("a name");
        let ns = item["metadata"]["namespace"].as_str();
        if cluster_scoped.contains(kind) {
            assert_eq!(ns, None, "{kind} {name} is cluster-scoped");
        } else {
            assert_eq!(ns, Some(namespace), "{kind} {name} of {dir}");
            namespaced += 1;
        }
    }
    assert!(
        namespaced >= 4,
        "only {namespaced} namespaced objects in {dir}"
    );
    items
}

/// The one object of `kind` named `name` among `items`.
fn object<'a>(items: &'a [Value], kind: &str, name: &str) -> &'a Value {
    items
        .iter()
        .find(|i| i["kind"] == kind && i["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name}"))
}

/// The container names of a workload's pod template.
fn containers(workload: &Value) -> Vec<String> {
    workload["spec"]["template"]["spec"]["containers"]
        .as_array()
        .expect("containers")
        .iter()
        .map(|c| c["name"].as_str().expect("a container name").to_string())
        .collect()
}

/// The StorageClass's parameters pass Palisade's parser with default settings, and do not
/// name the filesystem twice (csi-provisioner refuses `fsType` with
/// `csi.storage.k8s.io/fstype`).
fn check_storage_class(items: &[Value], name: &str) -> palisade::params::Parsed {
    let class = object(items, "StorageClass", name);
    assert_eq!(class["provisioner"], "driver.palisade.io");
    let parameters: HashMap<String, String> = class["parameters"]
        .as_object()
        .expect("parameters")
        .iter()
        .map(|(k, v)| (k.clone(), v.as_str().expect("a string").to_string()))
        .collect();
    let both = parameters.contains_key(palisade::params::FS_TYPE)
        && parameters.contains_key(palisade::params::CSI_FSTYPE);
    assert!(!both, "both fstype keys: {parameters:?}");
    assert!(
        parameters.contains_key(palisade::params::CSI_FSTYPE),
        "the filesystem is named by {}: {parameters:?}",
        palisade::params::CSI_FSTYPE
    );
    palisade::params::parse(&parameters, &palisade::settings::Settings::default())
        .unwrap_or_else(|e| panic!("StorageClass {name}: {e}"))
}

/// Where a permission applies.
#[derive(Clone, Copy)]
enum Scope<'a> {
    /// Every namespace (or a cluster-scoped resource).
    Cluster,
    In(&'a str),
}

/// Whether `sa` (`NAMESPACE:NAME`) may `verb` `resource` in `scope`, as the API server's
/// authorizer answers a SubjectAccessReview for it: what `kubectl auth can-i --as=
/// system:serviceaccount:NAMESPACE:NAME` asks, but with the API group given, which kubectl
/// drops for a resource the server does not serve (the palisade.io custom resources here,
/// snapshots, VolumeAttributesClasses in 1.32) and then gets "no" for every one of them.
///
/// `resource` is `plural[.group][/name][#subresource]`.
async fn can(
    client: &kube::Client,
    sa: &str,
    verb: &str,
    resource: &str,
    scope: Scope<'_>,
) -> bool {
    use k8s_openapi::api::authorization::v1::{
        ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
    };
    let (resource, subresource) = match resource.split_once('#') {
        Some((r, s)) => (r, Some(s.to_string())),
        None => (resource, None),
    };
    let (resource, name) = match resource.split_once('/') {
        Some((r, n)) => (r, Some(n.to_string())),
        None => (resource, None),
    };
    let (resource, group) = match resource {
        "*" => ("*", "*"),
        r => r.split_once('.').unwrap_or((r, "")),
    };
    let (sa_namespace, _) = sa.split_once(':').expect("NAMESPACE:NAME");
    let review = SubjectAccessReview {
        spec: SubjectAccessReviewSpec {
            user: Some(format!("system:serviceaccount:{sa}")),
            groups: Some(vec![
                "system:serviceaccounts".into(),
                format!("system:serviceaccounts:{sa_namespace}"),
                "system:authenticated".into(),
            ]),
            resource_attributes: Some(ResourceAttributes {
                verb: Some(verb.into()),
                group: Some(group.into()),
                resource: Some(resource.into()),
                subresource,
                name,
                namespace: match scope {
                    Scope::Cluster => None,
                    Scope::In(ns) => Some(ns.into()),
                },
                ..ResourceAttributes::default()
            }),
            ..SubjectAccessReviewSpec::default()
        },
        ..SubjectAccessReview::default()
    };
    let answer = kube::Api::<SubjectAccessReview>::all(client.clone())
        .create(&kube::api::PostParams::default(), &review)
        .await
        .expect("a SubjectAccessReview");
    answer.status.is_some_and(|s| s.allowed)
}

/// Checks that `sa` may do every one of `allowed` and none of `denied`, reporting all the
/// mismatches at once.
async fn check_permissions(
    client: &kube::Client,
    sa: &str,
    allowed: &[(&str, &str, Scope<'_>)],
    denied: &[(&str, &str, Scope<'_>)],
) {
    let mut wrong = Vec::new();
    for (verb, resource, scope) in allowed {
        if !can(client, sa, verb, resource, *scope).await {
            wrong.push(format!("cannot {verb} {resource} {}", describe(*scope)));
        }
    }
    for (verb, resource, scope) in denied {
        if can(client, sa, verb, resource, *scope).await {
            wrong.push(format!("CAN {verb} {resource} {}", describe(*scope)));
        }
    }
    assert!(wrong.is_empty(), "{sa}:\n  {}", wrong.join("\n  "));
}

fn describe(scope: Scope) -> String {
    match scope {
        Scope::Cluster => "cluster-wide".into(),
        Scope::In(ns) => format!("in {ns}"),
    }
}

/// What nobody of Palisade may do, whatever the mode.
fn never<'a>(ns: &'a str) -> Vec<(&'static str, &'static str, Scope<'a>)> {
    use Scope::{Cluster, In};
    vec![
        ("*", "*", Cluster),
        ("*", "*", In(ns)),
        ("delete", "namespaces", Cluster),
        ("create", "namespaces", Cluster),
        ("get", "secrets", In("default")),
        ("get", "secrets", In("kube-system")),
        ("list", "secrets", In(ns)),
        ("watch", "secrets", In(ns)),
        ("get", "secrets/some-other-secret", In(ns)),
        ("get", "configmaps", In("kube-system")),
        ("create", "pods", Cluster),
        ("create", "pods", In(ns)),
        ("create", "pods#exec", In("default")),
        ("create", "serviceaccounts#token", In(ns)),
        ("update", "nodes", Cluster),
        ("delete", "nodes", Cluster),
        ("delete", "persistentvolumeclaims", Cluster),
        ("create", "storageclasses.storage.k8s.io", Cluster),
        ("delete", "csidrivers.storage.k8s.io", Cluster),
        ("create", "leases.coordination.k8s.io", In("kube-system")),
        (
            "update",
            "leases.coordination.k8s.io",
            In("kube-node-lease"),
        ),
        (
            "create",
            "clusterrolebindings.rbac.authorization.k8s.io",
            Cluster,
        ),
        ("create", "rolebindings.rbac.authorization.k8s.io", In(ns)),
        (
            "escalate",
            "clusterroles.rbac.authorization.k8s.io",
            Cluster,
        ),
        ("bind", "clusterroles.rbac.authorization.k8s.io", Cluster),
        ("impersonate", "users", Cluster),
        ("impersonate", "serviceaccounts", In(ns)),
        (
            "create",
            "customresourcedefinitions.apiextensions.k8s.io",
            Cluster,
        ),
        (
            "delete",
            "customresourcedefinitions.apiextensions.k8s.io",
            Cluster,
        ),
    ]
}

/// The cluster mode's ServiceAccounts in namespace `ns`.
async fn check_cluster_permissions(client: &kube::Client, ns: &str) {
    use Scope::{Cluster, In};
    let controller = format!("{ns}:palisade-controller");
    let mut allowed = vec![
        // csi-provisioner
        ("create", "persistentvolumes", Cluster),
        ("delete", "persistentvolumes", Cluster),
        ("patch", "persistentvolumes", Cluster),
        ("watch", "persistentvolumes", Cluster),
        ("update", "persistentvolumeclaims", Cluster),
        ("watch", "persistentvolumeclaims", Cluster),
        ("watch", "storageclasses.storage.k8s.io", Cluster),
        ("create", "events", Cluster),
        ("patch", "events", Cluster),
        ("get", "nodes", Cluster),
        ("watch", "csinodes.storage.k8s.io", Cluster),
        ("watch", "volumeattachments.storage.k8s.io", Cluster),
        ("get", "volumeattributesclasses.storage.k8s.io", Cluster),
        ("update", "volumesnapshots.snapshot.storage.k8s.io", Cluster),
        // csi-attacher
        ("patch", "volumeattachments.storage.k8s.io", Cluster),
        ("patch", "volumeattachments.storage.k8s.io#status", Cluster),
        // csi-resizer
        ("patch", "persistentvolumeclaims#status", Cluster),
        ("watch", "pods", Cluster),
        ("watch", "volumeattributesclasses.storage.k8s.io", Cluster),
        // leader election of the sidecars and of palisade controller
        ("get", "leases.coordination.k8s.io", In(ns)),
        ("create", "leases.coordination.k8s.io", In(ns)),
        ("update", "leases.coordination.k8s.io", In(ns)),
        ("delete", "leases.coordination.k8s.io", In(ns)),
        // palisade controller: the cluster secret
        ("get", "secrets/palisade-cluster-secret", In(ns)),
        ("create", "secrets", In(ns)),
        // palisade controller: node health (Nodes, and the kubelets' Leases)
        ("list", "leases.coordination.k8s.io", In("kube-node-lease")),
        ("watch", "leases.coordination.k8s.io", In("kube-node-lease")),
        // palisade controller: the recovery controllers
        ("list", "nodes", Cluster),
        ("watch", "nodes", Cluster),
        ("watch", "replicasets.apps", Cluster),
        ("delete", "pods", Cluster),
        ("delete", "volumeattachments.storage.k8s.io", Cluster),
        ("list", "persistentvolumeclaims", Cluster),
        ("patch", "nodes#status", Cluster),
        // the node-down failover's taint, and a Terminating pod on a dead node marked Failed
        ("patch", "nodes", Cluster),
        ("patch", "pods#status", Cluster),
    ];
    // palisade controller: the Kubernetes store
    for kind in [
        "palisadevolumes.palisade.io",
        "palisadereplicas.palisade.io",
        "palisadenodes.palisade.io",
        "palisadesettings.palisade.io",
    ] {
        for verb in [
            "get", "list", "watch", "create", "update", "patch", "delete",
        ] {
            allowed.push((verb, kind, In(ns)));
        }
    }
    let mut denied = never(ns);
    denied.extend([
        // Its custom resources in its own namespace only.
        ("get", "palisadevolumes.palisade.io", In("default")),
        ("create", "palisadevolumes.palisade.io", Cluster),
        ("deletecollection", "palisadevolumes.palisade.io", In(ns)),
        ("update", "secrets/palisade-cluster-secret", In(ns)),
        ("delete", "secrets/palisade-cluster-secret", In(ns)),
        ("get", "secrets/palisade-cluster-secret", In("default")),
        // No more than the apps it does not read.
        ("get", "deployments.apps", Cluster),
        ("get", "replicasets.apps", Cluster),
        (
            "update",
            "leases.coordination.k8s.io",
            In("kube-node-lease"),
        ),
        ("delete", "deployments.apps", Cluster),
        ("update", "pods", Cluster),
        ("update", "volumeattachments.storage.k8s.io", Cluster),
        ("update", "pods#status", Cluster),
        ("update", "nodes#status", Cluster),
        ("delete", "replicasets.apps", Cluster),
    ]);
    check_permissions(client, &controller, &allowed, &denied).await;

    // The node plugin calls no Kubernetes API at all.
    let node = format!("{ns}:palisade-node");
    let mut denied = never(ns);
    denied.extend([
        ("get", "nodes", Cluster),
        ("patch", "nodes", Cluster),
        ("patch", "pods#status", Cluster),
        ("list", "pods", Cluster),
        ("create", "events", In(ns)),
        ("get", "secrets/palisade-cluster-secret", In(ns)),
        ("get", "palisadevolumes.palisade.io", In(ns)),
        ("get", "leases.coordination.k8s.io", In(ns)),
        ("get", "volumeattachments.storage.k8s.io", Cluster),
    ]);
    check_permissions(client, &node, &[], &denied).await;
}

/// The standalone-per-node mode's ServiceAccount in namespace `ns`.
async fn check_standalone_permissions(client: &kube::Client, ns: &str) {
    use Scope::{Cluster, In};
    let sa = format!("{ns}:palisade-standalone");
    let allowed = [
        // csi-provisioner --node-deployment
        ("create", "persistentvolumes", Cluster),
        ("delete", "persistentvolumes", Cluster),
        ("patch", "persistentvolumes", Cluster),
        ("update", "persistentvolumeclaims", Cluster),
        ("watch", "persistentvolumeclaims", Cluster),
        ("watch", "storageclasses.storage.k8s.io", Cluster),
        ("create", "events", Cluster),
        ("get", "nodes", Cluster),
        ("watch", "csinodes.storage.k8s.io", Cluster),
        ("watch", "volumeattachments.storage.k8s.io", Cluster),
        ("get", "volumeattributesclasses.storage.k8s.io", Cluster),
        // csi-resizer, and its leader election
        ("patch", "persistentvolumeclaims#status", Cluster),
        ("watch", "pods", Cluster),
        ("get", "leases.coordination.k8s.io", In(ns)),
        ("create", "leases.coordination.k8s.io", In(ns)),
        ("update", "leases.coordination.k8s.io", In(ns)),
    ];
    let mut denied = never(ns);
    denied.extend([
        // No attacher, no recovery controller, no Kubernetes store in this mode.
        ("patch", "volumeattachments.storage.k8s.io", Cluster),
        ("patch", "volumeattachments.storage.k8s.io#status", Cluster),
        ("delete", "volumeattachments.storage.k8s.io", Cluster),
        ("delete", "pods", Cluster),
        ("patch", "nodes", Cluster),
        ("patch", "pods#status", Cluster),
        ("get", "palisadevolumes.palisade.io", In(ns)),
        ("create", "secrets", In(ns)),
        ("get", "secrets/palisade-cluster-secret", In(ns)),
    ]);
    check_permissions(client, &sa, &allowed, &denied).await;
}

#[tokio::test]
async fn the_cluster_manifests_apply_in_any_namespace_with_least_privilege() {
    let test = "deploy::the_cluster_manifests_apply_in_any_namespace_with_least_privilege";
    let Some(plane) = ControlPlane::start(test).await else {
        return;
    };
    // An overlay first, on an empty server: nothing may land in the default namespace, and
    // the bindings must name the overlay's ServiceAccounts.
    let moved = overlay("cluster", OVERLAY_NAMESPACE);
    let items = apply_in(&plane, moved.path(), OVERLAY_NAMESPACE);
    let absent = plane.kubectl(&["get", "namespace", DEFAULT_NAMESPACE]);
    assert!(
        !absent.status.success(),
        "the overlay created {DEFAULT_NAMESPACE}"
    );
    let controller = object(&items, "Deployment", "palisade-controller");
    assert_eq!(controller["spec"]["replicas"], 2);
    assert_eq!(
        containers(controller),
        [
            "palisade",
            "csi-provisioner",
            "csi-attacher",
            "csi-resizer",
            "livenessprobe"
        ]
    );
    let node = object(&items, "DaemonSet", "palisade-node");
    assert_eq!(
        containers(node),
        ["palisade", "node-driver-registrar", "livenessprobe"]
    );
    let parsed = check_storage_class(&items, "palisade");
    assert_eq!(parsed.params.number_of_replicas, 3);
    let client = plane.client().await;
    check_cluster_permissions(&client, OVERLAY_NAMESPACE).await;
    plane.kubectl_ok(&[
        "apply",
        "-n",
        OVERLAY_NAMESPACE,
        "-f",
        &deploy_dir("cluster")
            .join("examples/pvc-deployment.yaml")
            .display()
            .to_string(),
    ]);

    // Then the kustomization as it is, in its own namespace.
    apply_in(&plane, &deploy_dir("cluster"), DEFAULT_NAMESPACE);
    check_cluster_permissions(&client, DEFAULT_NAMESPACE).await;
}

#[tokio::test]
async fn the_standalone_per_node_manifests_apply_in_any_namespace_with_least_privilege() {
    let test =
        "deploy::the_standalone_per_node_manifests_apply_in_any_namespace_with_least_privilege";
    let Some(plane) = ControlPlane::start(test).await else {
        return;
    };
    let moved = overlay("standalone-per-node", OVERLAY_NAMESPACE);
    let items = apply_in(&plane, moved.path(), OVERLAY_NAMESPACE);
    let absent = plane.kubectl(&["get", "namespace", DEFAULT_NAMESPACE]);
    assert!(
        !absent.status.success(),
        "the overlay created {DEFAULT_NAMESPACE}"
    );
    let daemonset = object(&items, "DaemonSet", "palisade-standalone");
    assert_eq!(
        containers(daemonset),
        [
            "palisade",
            "csi-provisioner",
            "csi-resizer",
            "node-driver-registrar",
            "livenessprobe"
        ]
    );
    let parsed = check_storage_class(&items, "palisade-local");
    assert_eq!(parsed.params.number_of_replicas, 1);
    assert_eq!(
        parsed.params.data_locality,
        palisade::params::DataLocality::StrictLocal
    );
    let client = plane.client().await;
    check_standalone_permissions(&client, OVERLAY_NAMESPACE).await;
    // A pod needs its namespace's default ServiceAccount, which kube-controller-manager
    // (not running here) would make.
    plane.kubectl_ok(&[
        "create",
        "serviceaccount",
        "default",
        "-n",
        OVERLAY_NAMESPACE,
    ]);
    plane.kubectl_ok(&[
        "apply",
        "-n",
        OVERLAY_NAMESPACE,
        "-f",
        &deploy_dir("standalone-per-node")
            .join("examples/pvc-pod.yaml")
            .display()
            .to_string(),
    ]);

    apply_in(
        &plane,
        &deploy_dir("standalone-per-node"),
        DEFAULT_NAMESPACE,
    );
    check_standalone_permissions(&client, DEFAULT_NAMESPACE).await;
}
