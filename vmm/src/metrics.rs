//! A small builder for the Prometheus text exposition format (version 0.0.4), which
//! `GET /metrics` serves.
//!
//! Samples are grouped by metric family whatever order they are added in, each family gets one
//! `# HELP` and one `# TYPE` line, names are made valid, and label values are escaped. Metrics
//! live with their owners (the VM, each device, the swapper, the sharing sample, host KSM), who
//! say whether each is a counter or a gauge ([`memory::Metric`]); the handler of
//! [`crate::action::Action::Metrics`] reads them into a [`PromText`] on each scrape, adding a
//! prefix and labels.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::atomic::Ordering;

use memory::{Metric, MetricKind, MetricValue};

use crate::vcpu::ExitCounters;

/// The `Content-Type` of the text this module produces.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

fn kind_name(kind: MetricKind) -> &'static str {
    match kind {
        MetricKind::Counter => "counter",
        MetricKind::Gauge => "gauge",
    }
}

#[derive(Debug)]
struct Family {
    name: String,
    help: String,
    kind: MetricKind,
    samples: Vec<String>,
}

/// Prometheus text under construction. Families appear in the order they were first added.
#[derive(Debug, Default)]
pub struct PromText {
    families: Vec<Family>,
    by_name: HashMap<String, usize>,
}

impl PromText {
    /// An empty exposition.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a counter sample. By convention `name` ends in `_total`.
    pub fn counter(&mut self, name: &str, help: &str, labels: &[(&str, &str)], value: u64) {
        self.sample(MetricKind::Counter, name, help, labels, &value.to_string());
    }

    /// Adds a gauge sample.
    pub fn gauge(&mut self, name: &str, help: &str, labels: &[(&str, &str)], value: f64) {
        self.sample(MetricKind::Gauge, name, help, labels, &format_value(value));
    }

    /// Adds an owner's metrics, each named `prefix` + its name (`_total` added to a counter's
    /// name that lacks it), with `labels`, of the kind and help the owner gave.
    pub fn metrics(&mut self, prefix: &str, labels: &[(&str, &str)], metrics: &[Metric]) {
        for m in metrics {
            let mut name = format!("{prefix}{}", m.name);
            match m.value {
                MetricValue::Counter(v) => {
                    if !name.ends_with("_total") {
                        name.push_str("_total");
                    }
                    self.counter(&name, m.help, labels, v);
                }
                MetricValue::Gauge(v) => self.gauge(&name, m.help, labels, v),
            }
        }
    }

    /// Adds `memvisor_vmm_resident_bytes`, this process's resident memory (nothing if
    /// `/proc/self/statm` cannot be read).
    pub fn vmm_resident(&mut self) {
        if let Some(bytes) = process_resident_bytes() {
            self.gauge(
                "memvisor_vmm_resident_bytes",
                "Resident memory of the VMM process, guest RAM included.",
                &[],
                bytes as f64,
            );
        }
    }

    /// Adds `memvisor_guest_ram_resident_bytes{vm}`: guest RAM resident in host memory.
    pub fn guest_ram_resident(&mut self, vm: &str, bytes: u64) {
        self.gauge(
            "memvisor_guest_ram_resident_bytes",
            "Guest RAM resident in host memory.",
            &[("vm", vm)],
            bytes as f64,
        );
    }

    /// Adds a VM's exits by reason as `memvisor_vm_exits_total{vm, reason}`.
    pub fn exit_counters(&mut self, vm: &str, exits: &ExitCounters) {
        let reasons = [
            ("io_in", &exits.io_in),
            ("io_out", &exits.io_out),
            ("mmio_read", &exits.mmio_read),
            ("mmio_write", &exits.mmio_write),
            ("unhandled_access", &exits.unhandled_access),
            ("compat_int3", &exits.compat_int3),
            ("interrupted", &exits.interrupted),
        ];
        for (reason, count) in reasons {
            self.counter(
                "memvisor_vm_exits_total",
                "VM exits handled by the vCPU threads, by reason.",
                &[("vm", vm), ("reason", reason)],
                count.load(Ordering::Relaxed),
            );
        }
    }

    /// The exposition text.
    pub fn finish(self) -> String {
        let mut out = String::new();
        for f in &self.families {
            // Writing to a String cannot fail.
            let _ = writeln!(out, "# HELP {} {}", f.name, escape_help(&f.help));
            let _ = writeln!(out, "# TYPE {} {}", f.name, kind_name(f.kind));
            for s in &f.samples {
                out.push_str(s);
                out.push('\n');
            }
        }
        out
    }

    fn sample(
        &mut self,
        kind: MetricKind,
        name: &str,
        help: &str,
        labels: &[(&str, &str)],
        value: &str,
    ) {
        let name = sanitize_name(name);
        let index = match self.by_name.get(&name) {
            Some(&i) => {
                if self.families[i].kind != kind {
                    tracing::warn!(
                        "metric {name} is a {}, not a {}: sample dropped",
                        kind_name(self.families[i].kind),
                        kind_name(kind)
                    );
                    return;
                }
                i
            }
            None => {
                self.families.push(Family {
                    name: name.clone(),
                    help: help.to_owned(),
                    kind,
                    samples: Vec::new(),
                });
                self.by_name.insert(name.clone(), self.families.len() - 1);
                self.families.len() - 1
            }
        };
        let mut line = name;
        if !labels.is_empty() {
            line.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    line.push(',');
                }
                let _ = write!(
                    line,
                    "{}=\"{}\"",
                    sanitize_label_name(k),
                    escape_label_value(v)
                );
            }
            line.push('}');
        }
        line.push(' ');
        line.push_str(value);
        self.families[index].samples.push(line);
    }
}

/// A valid metric name: `[a-zA-Z_:][a-zA-Z0-9_:]*`; any other character becomes `_`.
pub fn sanitize_name(name: &str) -> String {
    sanitize(name, |c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

/// A valid label name: `[a-zA-Z_][a-zA-Z0-9_]*`; any other character becomes `_`.
pub fn sanitize_label_name(name: &str) -> String {
    sanitize(name, |c| c.is_ascii_alphanumeric() || c == '_')
}

fn sanitize(name: &str, allowed: impl Fn(char) -> bool) -> String {
    let mut out: String = name
        .chars()
        .map(|c| if allowed(c) { c } else { '_' })
        .collect();
    if out.is_empty() || out.starts_with(|c: char| c.is_ascii_digit()) {
        out.insert(0, '_');
    }
    out
}

/// Escapes a label value: backslash, double quote and newline.
pub fn escape_label_value(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// Escapes a `# HELP` text: backslash and newline.
pub fn escape_help(v: &str) -> String {
    v.replace('\\', "\\\\").replace('\n', "\\n")
}

/// A sample value as Prometheus writes it (`NaN`, `+Inf`, `-Inf`, or a decimal number).
pub fn format_value(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 { "+Inf" } else { "-Inf" }.into()
    } else {
        v.to_string()
    }
}

/// This process's resident set size in bytes, from `/proc/self/statm`.
pub fn process_resident_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/statm").ok()?;
    // SAFETY: sysconf has no memory-safety preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    parse_statm_resident(&text, u64::try_from(page).ok()?)
}

/// The resident size in bytes from the text of a `statm` file (the second field, in pages).
pub fn parse_statm_resident(statm: &str, page_size: u64) -> Option<u64> {
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    pages.checked_mul(page_size)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_get_one_help_and_type_and_group_their_samples() {
        let mut t = PromText::new();
        t.counter("a_total", "A things.", &[("vm", "vm0")], 1);
        t.gauge("b_bytes", "B size.", &[], 2.5);
        t.counter("a_total", "ignored help", &[("vm", "vm1")], 3);
        assert_eq!(
            t.finish(),
            "# HELP a_total A things.\n\
             # TYPE a_total counter\n\
             a_total{vm=\"vm0\"} 1\n\
             a_total{vm=\"vm1\"} 3\n\
             # HELP b_bytes B size.\n\
             # TYPE b_bytes gauge\n\
             b_bytes 2.5\n"
        );
    }

    #[test]
    fn label_values_are_escaped() {
        let mut t = PromText::new();
        t.gauge("g", "h", &[("path", "a\\b\"c\nd")], 1.0);
        assert!(
            t.finish().contains(r#"g{path="a\\b\"c\nd"} 1"#),
            "escaped backslash, quote and newline"
        );
    }

    #[test]
    fn help_text_escapes_newlines_and_backslashes() {
        assert_eq!(escape_help("one\ntwo \\ three"), "one\\ntwo \\\\ three");
    }

    #[test]
    fn invalid_names_are_sanitized() {
        assert_eq!(sanitize_name("virtio-mem.plug"), "virtio_mem_plug");
        assert_eq!(sanitize_name("9lives"), "_9lives");
        assert_eq!(sanitize_name("ns:metric"), "ns:metric");
        assert_eq!(sanitize_label_name("ns:label"), "ns_label");
        assert_eq!(sanitize_label_name(""), "_");
    }

    #[test]
    fn a_sample_of_the_wrong_kind_is_dropped() {
        let mut t = PromText::new();
        t.counter("x_total", "X.", &[], 1);
        t.gauge("x_total", "X.", &[], 2.0);
        let text = t.finish();
        assert!(text.contains("x_total 1\n"), "{text}");
        assert!(!text.contains("x_total 2"), "{text}");
    }

    #[test]
    fn special_values_use_prometheus_spelling() {
        assert_eq!(format_value(f64::NAN), "NaN");
        assert_eq!(format_value(f64::INFINITY), "+Inf");
        assert_eq!(format_value(f64::NEG_INFINITY), "-Inf");
        assert_eq!(format_value(3.0), "3");
        assert_eq!(format_value(0.25), "0.25");
    }

    #[test]
    fn owner_metrics_get_the_prefix_labels_and_their_kind() {
        let mut t = PromText::new();
        t.metrics(
            "memvisor_device_",
            &[("vm", "vm0"), ("device", "swap")],
            &[
                Metric::level("swap_swapped_pages", "Pages in swap.", 7),
                Metric::counter("swap_faults_served", "Faults served.", 3),
                Metric::counter("deflates_total", "Deflates.", 2),
            ],
        );
        let text = t.finish();
        assert!(
            text.contains("# TYPE memvisor_device_swap_swapped_pages gauge\n"),
            "{text}"
        );
        assert!(
            text.contains("memvisor_device_swap_swapped_pages{vm=\"vm0\",device=\"swap\"} 7\n"),
            "{text}"
        );
        assert!(
            text.contains("# HELP memvisor_device_swap_faults_served_total Faults served.\n"),
            "{text}"
        );
        assert!(
            text.contains("# TYPE memvisor_device_swap_faults_served_total counter\n"),
            "{text}"
        );
        assert!(
            text.contains("memvisor_device_deflates_total{vm=\"vm0\",device=\"swap\"} 2\n"),
            "the _total suffix is not doubled: {text}"
        );
        assert_eq!(text.matches("# TYPE").count(), 3);
    }

    #[test]
    fn exit_counters_are_labelled_by_reason() {
        let exits = ExitCounters::default();
        exits.mmio_write.store(7, Ordering::Relaxed);
        let mut t = PromText::new();
        t.exit_counters("vm0", &exits);
        let text = t.finish();
        assert!(
            text.contains("memvisor_vm_exits_total{vm=\"vm0\",reason=\"mmio_write\"} 7\n"),
            "{text}"
        );
        assert_eq!(text.matches("# HELP memvisor_vm_exits_total").count(), 1);
        assert_eq!(text.lines().count(), 2 + 7);
    }

    #[test]
    fn standard_memory_gauges_have_their_documented_names() {
        let mut t = PromText::new();
        t.vmm_resident();
        t.guest_ram_resident("vm0", 3 << 20);
        let text = t.finish();
        assert!(
            text.contains("# TYPE memvisor_vmm_resident_bytes gauge\n"),
            "{text}"
        );
        assert!(
            text.contains("memvisor_guest_ram_resident_bytes{vm=\"vm0\"} 3145728\n"),
            "{text}"
        );
    }

    #[test]
    fn statm_resident_is_the_second_field_in_pages() {
        assert_eq!(
            parse_statm_resident("1000 250 30 1 0 90 0\n", 4096),
            Some(250 * 4096)
        );
        assert_eq!(parse_statm_resident("1000", 4096), None);
        assert_eq!(parse_statm_resident("", 4096), None);
    }

    #[test]
    fn this_process_has_a_resident_size() {
        assert!(process_resident_bytes().is_some_and(|b| b > 0));
    }
}
