//! How results are shown: aligned tables for people, the API's JSON objects
//! with `--json` (the same in both modes).

use arrakis_api::wire::fs::{Entry, EntryKind};
use arrakis_api::wire::snapshots::Snapshot;
use arrakis_api::wire::{PortForward, Vm, VmStatus};
use arrakis_runtime::network::EgressPolicy;
use serde::Serialize;

/// The error and all its causes on one line.
pub fn error_chain(error: &anyhow::Error) -> String {
    format!("{error:#}")
}

/// Writes `text` to stdout; a reader that went away (`| head`) is not an
/// error.
pub fn print(text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    match stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
    {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
        _ => Ok(()),
    }
}

pub fn json(value: &impl Serialize) -> anyhow::Result<()> {
    print(&format!("{}\n", serde_json::to_string_pretty(value)?))
}

/// Columns padded to their widest cell (counted in characters), separated
/// by two spaces; the last column is not padded.
pub struct Table {
    headers: Vec<&'static str>,
    /// Columns aligned to the right (numbers).
    right: Vec<bool>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// `headers` whose name starts with '>' are right-aligned (the '>' is
    /// not shown).
    pub fn new(headers: &[&'static str]) -> Table {
        Table {
            headers: headers.iter().map(|h| h.trim_start_matches('>')).collect(),
            right: headers.iter().map(|h| h.starts_with('>')).collect(),
            rows: Vec::new(),
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        debug_assert_eq!(cells.len(), self.headers.len());
        self.rows.push(cells);
    }

    pub fn render(&self) -> String {
        let mut widths: Vec<usize> = self.headers.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            for (width, cell) in widths.iter_mut().zip(row) {
                *width = (*width).max(cell.chars().count());
            }
        }
        let headers: Vec<String> = self.headers.iter().map(|h| h.to_string()).collect();
        let mut out = String::new();
        for row in std::iter::once(&headers).chain(&self.rows) {
            let last = row.len() - 1;
            let mut line = String::new();
            for (i, cell) in row.iter().enumerate() {
                let pad = widths[i].saturating_sub(cell.chars().count());
                if i > 0 {
                    line.push_str("  ");
                }
                if self.right[i] {
                    line.extend(std::iter::repeat_n(' ', pad));
                    line.push_str(cell);
                } else {
                    line.push_str(cell);
                    if i != last {
                        line.extend(std::iter::repeat_n(' ', pad));
                    }
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

pub fn status_text(status: VmStatus) -> &'static str {
    match status {
        VmStatus::Running => "RUNNING",
        VmStatus::Stopped => "STOPPED",
        VmStatus::Paused => "PAUSED",
    }
}

/// `2025-05-26T07:17:03Z` as `2025-05-26 07:17:03`.
pub fn when(rfc3339: &str) -> String {
    let text = rfc3339.replacen('T', " ", 1);
    text.strip_suffix('Z').map(str::to_string).unwrap_or(text)
}

/// The guest address without its prefix length, or `-` without a NIC.
fn address(vm: &Vm) -> &str {
    match vm.ip.split('/').next() {
        Some(ip) if !ip.is_empty() => ip,
        _ => "-",
    }
}

pub fn vm_table(vms: &[Vm]) -> String {
    let mut table = Table::new(&[
        "NAME", "STATUS", "IP", ">VCPUS", ">MEMORY", "IMAGE", "CREATED",
    ]);
    for vm in vms {
        table.row(vec![
            vm.vm_name.clone(),
            status_text(vm.status).to_string(),
            address(vm).to_string(),
            vm.vcpus.to_string(),
            format!("{}M", vm.memory_mb),
            vm.image.clone(),
            when(&vm.created_at),
        ]);
    }
    table.render()
}

pub fn vms(vms: &[Vm], json: bool) -> anyhow::Result<()> {
    if json {
        return self::json(&vms);
    }
    print(&vm_table(vms))
}

pub fn vm(vm: &Vm, json: bool) -> anyhow::Result<()> {
    if json {
        return self::json(vm);
    }
    print(&vm_table(std::slice::from_ref(vm)))
}

/// One sandbox as `Label:  value` lines, its network included.
pub fn vm_lines(vm: &Vm) -> String {
    let mut lines: Vec<(&str, String)> = vec![
        ("Name", vm.vm_name.clone()),
        ("Status", status_text(vm.status).to_string()),
        ("ID", vm.id.clone()),
        ("vCPUs", vm.vcpus.to_string()),
        ("Memory", format!("{}M", vm.memory_mb)),
        ("Image", vm.image.clone()),
        ("Created", when(&vm.created_at)),
    ];
    if let Some(snapshot) = &vm.from_snapshot {
        lines.push(("From snapshot", snapshot.clone()));
    }
    match &vm.network_mode {
        Some(mode) => {
            lines.push(("Network", mode.clone()));
            lines.push(("IP", vm.ip.clone()));
            lines.extend(vm.mac.clone().map(|mac| ("MAC", mac)));
            if !vm.tap_device_name.is_empty() {
                lines.push(("Tap", vm.tap_device_name.clone()));
            }
            lines.extend(vm.egress.as_ref().map(|e| ("Egress", egress_text(e))));
        }
        None => lines.push(("Network", "none".to_string())),
    }
    let hosts = vm.port_forwards.iter().map(|f| f.host_port.chars().count());
    let host_width = hosts.max().unwrap_or(0);
    let mut forwards = vm.port_forwards.iter().map(|f| {
        let line = format!("{:>host_width$} -> {}", f.host_port, f.guest_port);
        match f.description.as_str() {
            "" => line,
            description => format!("{line}  {description}"),
        }
    });
    lines.push(("Forwards", forwards.next().unwrap_or_else(|| "none".into())));
    lines.extend(forwards.map(|line| ("", line)));

    let width = lines
        .iter()
        .map(|(label, _)| label.len())
        .max()
        .unwrap_or(0)
        + 1;
    let mut out = String::new();
    for (label, value) in lines {
        let label = if label.is_empty() {
            String::new()
        } else {
            format!("{label}:")
        };
        out.push_str(format!("{label:width$}  {value}").trim_end());
        out.push('\n');
    }
    out
}

pub fn vm_details(vm: &Vm, json: bool) -> anyhow::Result<()> {
    if json {
        return self::json(vm);
    }
    print(&vm_lines(vm))
}

pub fn forward_table(forwards: &[PortForward]) -> String {
    let mut table = Table::new(&[">HOST", ">GUEST", "DESCRIPTION"]);
    for forward in forwards {
        table.row(vec![
            forward.host_port.clone(),
            forward.guest_port.clone(),
            forward.description.clone(),
        ]);
    }
    table.render()
}

pub fn forwards(forwards: &[PortForward], json: bool) -> anyhow::Result<()> {
    if json {
        return self::json(&forwards);
    }
    print(&forward_table(forwards))
}

/// A policy as `--egress` takes it: `allow`, `deny` or `CIDR,CIDR`.
pub fn egress_text(egress: &EgressPolicy) -> String {
    match egress {
        EgressPolicy::AllowAll => "allow".to_string(),
        EgressPolicy::DenyAll => "deny".to_string(),
        EgressPolicy::AllowList(list) => {
            let cidrs: Vec<String> = list.iter().map(ToString::to_string).collect();
            cidrs.join(",")
        }
    }
}

/// The policy; with `--json`, `{"egress": ...}` as in the API.
pub fn egress(egress: &EgressPolicy, json: bool) -> anyhow::Result<()> {
    if json {
        return self::json(&serde_json::json!({ "egress": egress }));
    }
    print(&format!("{}\n", egress_text(egress)))
}

/// Bytes in binary units, one decimal above KiB (`512 B`, `1.5 MiB`).
pub fn size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

pub fn snapshot_table(snapshots: &[Snapshot]) -> String {
    let mut table = Table::new(&["ID", "VM", "CREATED", ">SIZE"]);
    for snapshot in snapshots {
        table.row(vec![
            snapshot.snapshot_id.clone(),
            snapshot.vm_name.clone(),
            when(&snapshot.created_at),
            size(snapshot.size_bytes),
        ]);
    }
    table.render()
}

pub fn snapshots(snapshots: &[Snapshot], json: bool) -> anyhow::Result<()> {
    if json {
        return self::json(&snapshots);
    }
    print(&snapshot_table(snapshots))
}

pub fn snapshot(snapshot: &Snapshot, json: bool) -> anyhow::Result<()> {
    if json {
        return self::json(snapshot);
    }
    print(&snapshot_table(std::slice::from_ref(snapshot)))
}

/// The lineage of snapshots: an indented tree, or nested JSON.
pub fn lineage(lineage: &crate::lineage::Lineage, json: bool) -> anyhow::Result<()> {
    if json {
        return self::json(lineage);
    }
    print(&crate::lineage::render(lineage))
}

/// `ls -l`-like lines: kind and mode, owner, size, name (and link target).
pub fn entry_lines(entries: &[Entry]) -> String {
    let mut table = Table::new(&["MODE", ">UID", ">GID", ">SIZE", "NAME"]);
    for entry in entries {
        let kind = match entry.kind {
            EntryKind::File => '-',
            EntryKind::Dir => 'd',
            EntryKind::Symlink => 'l',
            EntryKind::Other => '?',
        };
        let target = entry
            .link_target
            .as_ref()
            .map(|t| format!(" -> {t}"))
            .unwrap_or_default();
        table.row(vec![
            format!("{kind}{:0>4}", entry.mode),
            entry.uid.to_string(),
            entry.gid.to_string(),
            entry.size.to_string(),
            format!("{}{target}", entry.name),
        ]);
    }
    table.render()
}

pub fn entries(entries: &[Entry], json: bool) -> anyhow::Result<()> {
    if json {
        return self::json(&entries);
    }
    print(&entry_lines(entries))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vm(name: &str, status: VmStatus, vcpus: u32, memory_mb: u32) -> Vm {
        Vm {
            vm_name: name.into(),
            status,
            ip: String::new(),
            tap_device_name: String::new(),
            port_forwards: vec![],
            id: "id".into(),
            vcpus,
            memory_mb,
            image: "default".into(),
            created_at: "2025-05-26T07:17:03Z".into(),
            from_snapshot: None,
            network_mode: None,
            mac: None,
            egress: None,
        }
    }

    fn forward(host: &str, guest: &str, description: &str) -> PortForward {
        PortForward {
            host_port: host.into(),
            guest_port: guest.into(),
            description: description.into(),
        }
    }

    /// A sandbox with a NIC in `mode`, two forwards and an allow-list.
    fn networked(mode: &str, tap: &str) -> Vm {
        Vm {
            ip: "10.20.0.3/16".into(),
            tap_device_name: tap.into(),
            port_forwards: vec![forward("8080", "80", "web"), forward("40001", "22", "")],
            network_mode: Some(mode.into()),
            mac: Some("02:a5:0a:14:00:03".into()),
            egress: Some(EgressPolicy::AllowList(vec![
                "10.0.0.0/8".parse().unwrap(),
                "1.1.1.1/32".parse().unwrap(),
            ])),
            ..vm("dev", VmStatus::Running, 2, 512)
        }
    }

    #[test]
    fn vm_tables_align_on_the_widest_cell() {
        let table = vm_table(&[
            vm("a", VmStatus::Running, 1, 256),
            vm("my sandbox é", VmStatus::Stopped, 12, 16384),
            networked("user", ""),
        ]);
        assert_eq!(
            table,
            "\
NAME          STATUS   IP         VCPUS  MEMORY  IMAGE    CREATED
a             RUNNING  -              1    256M  default  2025-05-26 07:17:03
my sandbox é  STOPPED  -             12  16384M  default  2025-05-26 07:17:03
dev           RUNNING  10.20.0.3      2    512M  default  2025-05-26 07:17:03
"
        );
        assert_eq!(
            vm_table(&[]),
            "NAME  STATUS  IP  VCPUS  MEMORY  IMAGE  CREATED\n"
        );
    }

    #[test]
    fn one_vm_shows_its_network() {
        let mut bridged = networked("bridge", "ark-tap3");
        bridged.from_snapshot = Some("base".into());
        assert_eq!(
            vm_lines(&bridged),
            "\
Name:           dev
Status:         RUNNING
ID:             id
vCPUs:          2
Memory:         512M
Image:          default
Created:        2025-05-26 07:17:03
From snapshot:  base
Network:        bridge
IP:             10.20.0.3/16
MAC:            02:a5:0a:14:00:03
Tap:            ark-tap3
Egress:         10.0.0.0/8,1.1.1.1/32
Forwards:        8080 -> 80  web
                40001 -> 22
"
        );
        let mut user = networked("user", "");
        user.port_forwards.clear();
        user.egress = Some(EgressPolicy::DenyAll);
        let text = vm_lines(&user);
        assert!(
            !text.contains("Tap:") && !text.contains("From snapshot:"),
            "{text}"
        );
        assert!(
            text.contains("\nEgress:    deny\nForwards:  none\n"),
            "{text}"
        );
        // Restored from a snapshot taken before sandboxes had a NIC.
        let text = vm_lines(&vm("old", VmStatus::Stopped, 1, 256));
        assert!(
            text.ends_with("\nNetwork:   none\nForwards:  none\n") && !text.contains("IP:"),
            "{text}"
        );
    }

    #[test]
    fn forwards_and_egress_policies() {
        assert_eq!(
            forward_table(&[forward("8080", "80", "web"), forward("40001", "22", "")]),
            concat!(
                " HOST  GUEST  DESCRIPTION\n",
                " 8080     80  web\n",
                "40001     22\n"
            )
        );
        assert_eq!(forward_table(&[]), "HOST  GUEST  DESCRIPTION\n");
        assert_eq!(egress_text(&EgressPolicy::AllowAll), "allow");
        assert_eq!(egress_text(&EgressPolicy::DenyAll), "deny");
        let list = networked("user", "").egress.unwrap();
        assert_eq!(egress_text(&list), "10.0.0.0/8,1.1.1.1/32");
        // What is printed is what --egress takes back.
        for policy in [EgressPolicy::AllowAll, EgressPolicy::DenyAll, list] {
            assert_eq!(EgressPolicy::parse_list(&egress_text(&policy)), Ok(policy));
        }
    }

    #[test]
    fn snapshot_tables_and_sizes() {
        let snapshot = Snapshot {
            snapshot_id: "snap-1".into(),
            vm_name: "a b".into(),
            created_at: "2025-05-26T07:17:03Z".into(),
            vcpus: 1,
            memory_mb: 256,
            image: "default".into(),
            size_bytes: 3 * 1024 * 1024 / 2,
            parent_snapshot: None,
        };
        assert_eq!(
            snapshot_table(&[snapshot]),
            "\
ID      VM   CREATED                 SIZE
snap-1  a b  2025-05-26 07:17:03  1.5 MiB
"
        );
        assert_eq!(size(0), "0 B");
        assert_eq!(size(1023), "1023 B");
        assert_eq!(size(1024), "1.0 KiB");
        assert_eq!(size(5 << 30), "5.0 GiB");
    }

    #[test]
    fn entries_look_like_ls() {
        let entry = |name: &str, kind, mode: &str, size, target: Option<&str>| Entry {
            name: name.into(),
            path: format!("/x/{name}"),
            kind,
            size,
            mode: mode.into(),
            uid: 0,
            gid: 1000,
            modified: 0,
            link_target: target.map(String::from),
        };
        let text = entry_lines(&[
            entry("bin", EntryKind::Dir, "755", 4096, None),
            entry("a.txt", EntryKind::File, "644", 12, None),
            entry("l", EntryKind::Symlink, "777", 5, Some("a.txt")),
        ]);
        assert_eq!(
            text,
            "\
MODE   UID   GID  SIZE  NAME
d0755    0  1000  4096  bin
-0644    0  1000    12  a.txt
l0777    0  1000     5  l -> a.txt
"
        );
    }
}
