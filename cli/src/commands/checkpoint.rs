//! snapshots export / import: a snapshot as a self-contained directory (a
//! checkpoint) and back. The work is [`Manager::export_snapshot`] and
//! [`Manager::import_snapshot`]'s; these run on this machine's state only.

use std::path::Path;

use anyhow::bail;
use arrakis_api::wire::snapshots::Snapshot;
use arrakis_runtime::Manager;

use crate::backend::Backend;
use crate::output;

fn local<'a>(backend: &'a Backend, verb: &str) -> anyhow::Result<&'a Manager> {
    let Backend::Local(manager) = backend else {
        bail!(
            "`arrakis snapshots {verb}` reads and writes files on this machine and has no API: \
             run it without --server on the server's machine (same ARRAKIS_HOME)"
        );
    };
    Ok(manager)
}

pub async fn export(backend: &Backend, id: &str, dir: &Path, json: bool) -> anyhow::Result<()> {
    let exported = local(backend, "export")?.export_snapshot(id, dir).await?;
    if json {
        return output::json(&exported);
    }
    let mut table = output::Table::new(&["FILE", ">SIZE", "SHA256"]);
    for file in &exported.files {
        table.row(vec![
            file.name.clone(),
            file.size.to_string(),
            file.sha256.clone(),
        ]);
    }
    output::print(&format!(
        "{}exported snapshot {} to {} ({} bytes)\n",
        table.render(),
        exported.snapshot,
        exported.dir.display(),
        exported.bytes
    ))
}

pub async fn import(backend: &Backend, dir: &Path, json: bool) -> anyhow::Result<()> {
    let info = local(backend, "import")?.import_snapshot(dir).await?;
    output::snapshot(&Snapshot::from(&info), json)
}
