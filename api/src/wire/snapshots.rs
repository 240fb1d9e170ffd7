//! Snapshots as resources: `POST /v1/vms/{name}/snapshots` (the original's
//! route) creates one; `GET /v1/snapshots[/{id}]` and `DELETE
//! /v1/snapshots/{id}` are new.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// `POST /v1/vms/{name}/snapshots`. Unknown keys are ignored.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SnapshotRequest {
    /// Unique on this server (reusable once deleted); generated when
    /// absent or empty.
    #[serde(default)]
    pub snapshot_id: Option<String>,
}

/// A snapshot: the memory and disk of a VM at one instant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Snapshot {
    pub snapshot_id: String,
    /// The VM it was taken of.
    pub vm_name: String,
    /// RFC 3339, UTC.
    pub created_at: String,
    pub vcpus: u32,
    pub memory_mb: u32,
    pub image: String,
    /// Bytes on the host's disk.
    pub size_bytes: u64,
    /// The snapshot the VM was itself restored or forked from, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent_snapshot: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct SnapshotList {
    pub snapshots: Vec<Snapshot>,
}

/// `POST /v1/snapshots/{id}/fork` and `POST /v1/vms/{name}/fork`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ForkRequest {
    /// How many sandboxes, 1 to 64.
    pub count: u32,
    /// The forks are named `{namePrefix}-1` to `{namePrefix}-{count}`;
    /// default: the snapshot id or the VM's name, plus `-fork`.
    #[serde(default)]
    pub name_prefix: Option<String>,
}

/// `POST /v1/snapshots/{id}/restore`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RestoreRequest {
    /// The name of the new VM.
    pub vm_name: String,
}

/// `POST /v1/vms/{name}/rollback`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RollbackRequest {
    /// The snapshot whose state replaces the VM's.
    pub snapshot_id: String,
}
