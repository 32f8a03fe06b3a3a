//! What the Kubernetes store needs of each custom resource kind: which model type it holds,
//! how the stored object is built from a value, and which finalizer it carries.

use std::fmt::Debug;

use kube::core::NamespaceResourceScope;
use kube::Resource;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::model::{Node, Replica, Volume};
use crate::settings::Settings;
use crate::store::kubernetes::crd::{
    PalisadeNode, PalisadeReplica, PalisadeSettings, PalisadeVolume, VOLUME_FINALIZER,
};

/// A custom resource kind that holds one store table.
pub trait StoredResource:
    Resource<DynamicType = (), Scope = NamespaceResourceScope>
    + Clone
    + Debug
    + Serialize
    + DeserializeOwned
    + Send
    + Sync
    + 'static
{
    /// The model type stored.
    type Value: Clone + PartialEq + Serialize + DeserializeOwned + Send + Sync + 'static;
    /// The kind's name in errors ("volume").
    const KIND: &'static str;
    /// The finalizer the store keeps on every object of this kind, if any.
    const FINALIZER: Option<&'static str> = None;

    /// The object to write for `value` under `key`, named `name`: spec, the status derived
    /// from it, and the labels derived from it. Metadata owned by others is merged in later.
    fn stored(name: &str, key: &str, value: Self::Value) -> Self;
}

impl StoredResource for PalisadeVolume {
    type Value = Volume;
    const KIND: &'static str = "volume";
    const FINALIZER: Option<&'static str> = Some(VOLUME_FINALIZER);

    fn stored(name: &str, key: &str, value: Volume) -> Self {
        PalisadeVolume::stored(name, key, value)
    }
}

impl StoredResource for PalisadeReplica {
    type Value = Replica;
    const KIND: &'static str = "replica";

    fn stored(name: &str, key: &str, value: Replica) -> Self {
        PalisadeReplica::stored(name, key, value)
    }
}

impl StoredResource for PalisadeNode {
    type Value = Node;
    const KIND: &'static str = "node";

    fn stored(name: &str, key: &str, value: Node) -> Self {
        PalisadeNode::stored(name, key, value)
    }
}

impl StoredResource for PalisadeSettings {
    type Value = Settings;
    const KIND: &'static str = "settings";

    fn stored(name: &str, key: &str, value: Settings) -> Self {
        PalisadeSettings::stored(name, key, value)
    }
}
