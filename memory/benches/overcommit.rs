//! `bench/overcommit`: the simulator's scenarios under four policies side by side (memvisor's,
//! balloon only, swap only, static), with the figures of docs/BENCHMARKS.md. The model and what
//! it leaves out: `memory::scheduler::sim` and docs/scheduler.md.
//!
//! Arguments: an optional scenario name (`mixed`, `four-vms`, `phase-shift`, `no-balloon`,
//! `identical`, `steady`) to run only that one; `--trace` prints memvisor's run of it tick by
//! tick (host state, each VM's charged memory, allocation, target and working set, and every
//! decision with its rule).

use std::time::Instant;

use memory::scheduler::sim::{run, run_with, RunPolicy, Scenario, Sim};
use memory::scheduler::{decide, Policy, SchedulerState};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let only = args.iter().find(|a| !a.starts_with('-')).cloned();
    let trace = args.iter().any(|a| a == "--trace");
    let scenarios = [
        Scenario::mixed(),
        Scenario::four_vms(),
        Scenario::phase_shift(),
        Scenario::no_balloon(),
        Scenario::identical(),
        Scenario::steady(),
    ];
    if let Some(name) = &only {
        if !scenarios.iter().any(|s| s.name == name) {
            eprintln!("overcommit: no scenario named '{name}'");
            std::process::exit(2);
        }
    }
    let policies = [
        ("memvisor", RunPolicy::memvisor()),
        ("balloon-only", RunPolicy::balloon_only()),
        ("swap-only", RunPolicy::swap_only()),
        ("static", RunPolicy::Static),
    ];
    if !trace && only.as_deref().is_none_or(|o| o == "mixed") {
        decide_cost(&Scenario::mixed());
    }
    for s in scenarios
        .iter()
        .filter(|s| only.as_deref().is_none_or(|o| o == s.name))
    {
        if trace {
            print_trace(s);
            continue;
        }
        println!(
            "\n{}: {} VMs, {} MiB of guests on a {} MiB budget ({:.2}x), {} ticks of 1 s",
            s.name,
            s.guests.len(),
            s.guests
                .iter()
                .map(|g| g.boot_mib + g.plugged_mib)
                .sum::<u64>(),
            s.memory_budget_mib,
            s.overcommit(),
            s.ticks
        );
        println!(
            "{:<13} {:>10} {:>9} {:>9} {:>5} {:>9} {:>13} {:>14} {:>9}",
            "policy",
            "overcommit",
            "slowdown",
            "worst VM",
            "OOMs",
            "decisions",
            "within budget",
            "over (max run)",
            "peak MiB"
        );
        for (name, p) in &policies {
            let r = run(s, p);
            let within = r
                .ticks_to_budget
                .map_or("never".to_string(), |t| format!("tick {t}"));
            println!(
                "{:<13} {:>9.2}x {:>8.2}% {:>8.2}% {:>5} {:>9} {:>13} {:>14} {:>9}",
                name,
                r.overcommit,
                100.0 * r.slowdown,
                100.0 * r.worst_vm_slowdown,
                r.ooms,
                r.decisions,
                within,
                format!("{} ({})", r.ticks_over_budget, r.longest_over_budget),
                r.peak_charged_mib
            );
            assert_eq!(r.target_violations + r.floor_violations, 0, "{name}: {r:?}");
        }
    }
}

fn print_trace(s: &Scenario) {
    let r = run_with(s, &RunPolicy::memvisor(), |sim, state, decisions| {
        let vms: Vec<String> = sim
            .vms
            .iter()
            .map(|v| {
                let id = &v.spec.id;
                let rep = state.vm(id).copied().unwrap_or_default();
                format!(
                    "{id}: charged {} alloc {} target {} ws {}{}",
                    v.charged_mib(),
                    rep.alloc_mib,
                    rep.target_mib,
                    rep.working_set_mib,
                    if rep.pressed { " PRESSED" } else { "" }
                )
            })
            .collect();
        println!(
            "tick {} {:?} charged {} | {}",
            sim.tick,
            state.host_state(),
            sim.charged_mib(),
            vms.join(" | ")
        );
        for d in decisions {
            println!(
                "    {} {:?} {} -> {} ({:?})",
                d.vm, d.tool, d.from, d.to, d.reason.rule
            );
        }
    });
    println!("{r:?}");
}

/// Host CPU time of `decide` alone (the view built outside the timing), per tick and per VM,
/// over the scenario's run: best of 5 runs.
fn decide_cost(s: &Scenario) {
    let policy = Policy::on();
    let mut best = f64::MAX;
    for _ in 0..5 {
        let mut sim = Sim::new(s.memory_budget_mib, s.min_free_mib, s.guests.clone());
        let mut state = SchedulerState::default();
        let mut spent = 0.0;
        for _ in 0..s.ticks {
            let view = sim.view(&policy);
            let start = Instant::now();
            let d = decide(&policy, &view, &mut state);
            spent += start.elapsed().as_secs_f64();
            sim.apply(&d);
            sim.step();
        }
        best = best.min(spent / s.ticks as f64);
    }
    println!(
        "decide() on {}: {:.1} µs per tick for {} VMs ({:.2} µs per VM), best of 5 runs",
        s.name,
        best * 1e6,
        s.guests.len(),
        best * 1e6 / s.guests.len() as f64
    );
}
