//! The lineage of snapshots (`arrakis snapshots tree`): every snapshot
//! under the snapshot its sandbox came from (`parentSnapshot`), and the
//! live sandboxes restored, forked or rolled back from each snapshot
//! (`fromSnapshot`) as its leaves.
//!
//! Built from the two lists alone, so it is the same in both modes. A
//! parent may be gone: snapshots can be deleted (their descendants stay),
//! and a deleted snapshot's id can be taken again by an unrelated one.
//! Such snapshots, and sandboxes whose snapshot is gone, are shown at the
//! top, marked; no input makes the tree loop or lose a snapshot.

use std::collections::HashMap;

use arrakis_api::wire::snapshots::Snapshot;
use arrakis_api::wire::Vm;
use serde::Serialize;

use crate::output::{status_text, when};

/// The whole forest, as `--json` prints it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Lineage {
    /// Snapshots without a parent, or whose parent is gone, each with its
    /// descendants; oldest first.
    pub snapshots: Vec<Node>,
    /// Sandboxes whose snapshot (`fromSnapshot`) is gone.
    pub sandboxes: Vec<Vm>,
}

/// A snapshot (the API's object, flattened) and what descends from it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Node {
    #[serde(flatten)]
    pub snapshot: Snapshot,
    /// `parentSnapshot` names a snapshot that no longer exists (it was
    /// deleted, or its id now belongs to a later snapshot).
    pub parent_deleted: bool,
    /// Live sandboxes restored, forked or rolled back from this snapshot.
    pub sandboxes: Vec<Vm>,
    /// Snapshots taken of sandboxes that came from this one.
    pub children: Vec<Node>,
}

/// Arranges `snapshots` (oldest first, as both modes list them) and the
/// sandboxes `vms` as a forest. Sandboxes that did not come from a
/// snapshot are left out.
pub fn build(snapshots: &[Snapshot], vms: &[Vm]) -> Lineage {
    let count = snapshots.len();
    let index: HashMap<&str, usize> = snapshots
        .iter()
        .enumerate()
        .map(|(i, snapshot)| (snapshot.snapshot_id.as_str(), i))
        .collect();
    // A parent taken after its child (RFC 3339 UTC text sorts by time) is
    // an id used again once the real parent was deleted.
    let parents: Vec<Option<usize>> = snapshots
        .iter()
        .enumerate()
        .map(|(i, child)| {
            let parent = *index.get(child.parent_snapshot.as_deref()?)?;
            (parent != i && snapshots[parent].created_at <= child.created_at).then_some(parent)
        })
        .collect();
    let mut children = vec![Vec::new(); count];
    for (child, parent) in parents.iter().enumerate() {
        if let Some(parent) = parent {
            children[*parent].push(child);
        }
    }
    let mut leaves = vec![Vec::new(); count];
    let mut orphans = Vec::new();
    for vm in vms {
        if let Some(id) = vm.from_snapshot.as_deref() {
            match index.get(id) {
                Some(&i) => leaves[i].push(vm.clone()),
                None => orphans.push(vm.clone()),
            }
        }
    }

    let mut tree = Tree {
        snapshots,
        children,
        leaves,
        placed: vec![false; count],
    };
    let mut roots: Vec<(usize, Node)> = Vec::new();
    for (i, parent) in parents.iter().enumerate() {
        if parent.is_none() {
            let parent_deleted = snapshots[i].parent_snapshot.is_some();
            roots.push((i, tree.grow(i, parent_deleted)));
        }
    }
    // What is left hangs in a cycle, which only ids taken again within
    // the same second can make: cut each at its oldest snapshot, whose
    // parent must be the deleted one.
    for i in 0..count {
        if !tree.placed[i] {
            roots.push((i, tree.grow(i, true)));
        }
    }
    roots.sort_by_key(|(i, _)| *i);
    Lineage {
        snapshots: roots.into_iter().map(|(_, node)| node).collect(),
        sandboxes: orphans,
    }
}

struct Tree<'a> {
    snapshots: &'a [Snapshot],
    children: Vec<Vec<usize>>,
    leaves: Vec<Vec<Vm>>,
    placed: Vec<bool>,
}

impl Tree<'_> {
    /// The node of snapshot `i` with every descendant not placed yet.
    fn grow(&mut self, i: usize, parent_deleted: bool) -> Node {
        self.placed[i] = true;
        let mut children = Vec::new();
        for child in std::mem::take(&mut self.children[i]) {
            if !self.placed[child] {
                children.push(self.grow(child, false));
            }
        }
        Node {
            snapshot: self.snapshots[i].clone(),
            parent_deleted,
            sandboxes: std::mem::take(&mut self.leaves[i]),
            children,
        }
    }
}

/// The forest as an indented tree, one snapshot or sandbox a line:
///
/// ```text
/// snapshot base  of dev, 2025-05-26 07:17:03
/// ├── sandbox base-fork-1  RUNNING
/// └── snapshot s2  of base-fork-1, 2025-05-26 07:18:00
///     └── sandbox c  PAUSED
/// ```
pub fn render(lineage: &Lineage) -> String {
    if lineage.snapshots.is_empty() && lineage.sandboxes.is_empty() {
        return "no snapshots\n".to_string();
    }
    let mut out = String::new();
    for node in &lineage.snapshots {
        render_node(node, "", "", &mut out);
    }
    for vm in &lineage.sandboxes {
        let gone = vm.from_snapshot.as_deref().unwrap_or_default();
        out.push_str(&format!(
            "{}  (snapshot {gone} deleted)\n",
            sandbox_line(vm)
        ));
    }
    out
}

fn sandbox_line(vm: &Vm) -> String {
    format!("sandbox {}  {}", vm.vm_name, status_text(vm.status))
}

/// `first` starts the node's own line, `rest` the lines below it.
fn render_node(node: &Node, first: &str, rest: &str, out: &mut String) {
    let snapshot = &node.snapshot;
    out.push_str(&format!(
        "{first}snapshot {}  of {}, {}",
        snapshot.snapshot_id,
        snapshot.vm_name,
        when(&snapshot.created_at)
    ));
    if node.parent_deleted {
        let parent = snapshot.parent_snapshot.as_deref().unwrap_or_default();
        out.push_str(&format!("  (parent {parent} deleted)"));
    }
    out.push('\n');
    let total = node.sandboxes.len() + node.children.len();
    let branch = |k: usize| {
        if k + 1 == total {
            ("└── ", "    ")
        } else {
            ("├── ", "│   ")
        }
    };
    for (k, vm) in node.sandboxes.iter().enumerate() {
        let (mark, _) = branch(k);
        out.push_str(&format!("{rest}{mark}{}\n", sandbox_line(vm)));
    }
    for (k, child) in node.children.iter().enumerate() {
        let (mark, indent) = branch(node.sandboxes.len() + k);
        render_node(
            child,
            &format!("{rest}{mark}"),
            &format!("{rest}{indent}"),
            out,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrakis_api::wire::VmStatus;

    fn snap(id: &str, vm: &str, second: u32, parent: Option<&str>) -> Snapshot {
        Snapshot {
            snapshot_id: id.into(),
            vm_name: vm.into(),
            created_at: format!("2025-05-26T07:17:{second:02}Z"),
            vcpus: 1,
            memory_mb: 256,
            image: "default".into(),
            size_bytes: 1,
            parent_snapshot: parent.map(String::from),
        }
    }

    fn vm(name: &str, from: Option<&str>) -> Vm {
        Vm {
            vm_name: name.into(),
            status: VmStatus::Running,
            ip: String::new(),
            tap_device_name: String::new(),
            port_forwards: vec![],
            id: "id".into(),
            vcpus: 1,
            memory_mb: 256,
            image: "default".into(),
            created_at: "2025-05-26T07:17:00Z".into(),
            from_snapshot: from.map(String::from),
            network_mode: None,
            mac: None,
            egress: None,
        }
    }

    /// (id, parentDeleted, sandboxes, children) of a node, recursively.
    fn shape(node: &Node) -> String {
        let sandboxes: Vec<&str> = node.sandboxes.iter().map(|v| v.vm_name.as_str()).collect();
        let children: Vec<String> = node.children.iter().map(shape).collect();
        format!(
            "{}{}{:?}[{}]",
            node.snapshot.snapshot_id,
            if node.parent_deleted { "!" } else { "" },
            sandboxes,
            children.join(",")
        )
    }

    fn shapes(lineage: &Lineage) -> Vec<String> {
        lineage.snapshots.iter().map(shape).collect()
    }

    #[test]
    fn snapshots_nest_under_their_parent_with_their_sandboxes() {
        let snapshots = [
            snap("base", "dev", 1, None),
            snap("other", "cold", 2, None),
            snap("s2", "base-fork-1", 3, Some("base")),
            snap("s3", "c", 4, Some("s2")),
        ];
        let vms = [
            vm("dev", None),
            vm("base-fork-1", Some("base")),
            vm("base-fork-2", Some("base")),
            vm("c", Some("s2")),
            vm("cold", None),
        ];
        let lineage = build(&snapshots, &vms);
        assert_eq!(
            shapes(&lineage),
            [
                r#"base["base-fork-1", "base-fork-2"][s2["c"][s3[][]]]"#,
                "other[][]"
            ]
        );
        assert!(lineage.sandboxes.is_empty());
        assert_eq!(
            render(&lineage),
            "\
snapshot base  of dev, 2025-05-26 07:17:01
├── sandbox base-fork-1  RUNNING
├── sandbox base-fork-2  RUNNING
└── snapshot s2  of base-fork-1, 2025-05-26 07:17:03
    ├── sandbox c  RUNNING
    └── snapshot s3  of c, 2025-05-26 07:17:04
snapshot other  of cold, 2025-05-26 07:17:02
"
        );
    }

    #[test]
    fn the_descendants_of_a_deleted_snapshot_come_up_to_the_top() {
        // "base" was deleted: s2 and the sandbox forked from it stay.
        let snapshots = [
            snap("s2", "base-fork-1", 3, Some("base")),
            snap("s3", "x", 4, Some("s2")),
        ];
        let vms = [vm("base-fork-2", Some("base")), vm("x", Some("s2"))];
        let lineage = build(&snapshots, &vms);
        assert_eq!(shapes(&lineage), [r#"s2!["x"][s3[][]]"#]);
        assert_eq!(lineage.sandboxes.len(), 1);
        assert_eq!(
            render(&lineage),
            "\
snapshot s2  of base-fork-1, 2025-05-26 07:17:03  (parent base deleted)
├── sandbox x  RUNNING
└── snapshot s3  of x, 2025-05-26 07:17:04
sandbox base-fork-2  RUNNING  (snapshot base deleted)
"
        );
    }

    #[test]
    fn ids_taken_again_never_loop_or_lose_a_snapshot() {
        // "a" was deleted and its id taken by a snapshot of a sandbox
        // restored from it: its own parent. And "b" (child of the first
        // "a") under a later "a": the later one cannot be its parent.
        let lineage = build(
            &[snap("b", "v", 2, Some("a")), snap("a", "w", 5, Some("a"))],
            &[],
        );
        assert_eq!(shapes(&lineage), ["b![][]", "a![][]"]);
        // A true cycle, within one second: cut at the oldest, all shown.
        let lineage = build(
            &[
                snap("p", "v", 7, Some("q")),
                snap("q", "w", 7, Some("p")),
                snap("r", "x", 7, Some("q")),
            ],
            &[vm("y", Some("r"))],
        );
        assert_eq!(shapes(&lineage), [r#"p![][q[][r["y"][]]]"#]);
        assert_eq!(render(&build(&[], &[vm("cold", None)])), "no snapshots\n");
    }

    #[test]
    fn the_json_nests_the_api_objects() {
        let lineage = build(
            &[
                snap("base", "dev", 1, None),
                snap("s2", "f", 2, Some("base")),
            ],
            &[vm("f", Some("base")), vm("lost", Some("gone"))],
        );
        let json = serde_json::to_value(&lineage).unwrap();
        let base = &json["snapshots"][0];
        assert_eq!(base["snapshotId"], "base");
        assert_eq!(base["vmName"], "dev");
        assert_eq!(base["parentDeleted"], false);
        assert_eq!(base["sandboxes"][0]["vmName"], "f");
        assert_eq!(base["sandboxes"][0]["fromSnapshot"], "base");
        assert_eq!(base["children"][0]["snapshotId"], "s2");
        assert_eq!(base["children"][0]["parentSnapshot"], "base");
        assert_eq!(base["children"][0]["children"], serde_json::json!([]));
        assert_eq!(json["sandboxes"][0]["vmName"], "lost");
    }
}
