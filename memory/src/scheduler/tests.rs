//! Scenario tests: the real `decide` against the simulator.

use super::sim::{run_with, RunPolicy, Scenario};
use super::*;

#[test]
#[ignore = "debugging aid"]
fn debug_print() {
    let name = std::env::var("SCEN").unwrap_or_else(|_| "four-vms".into());
    let s = match name.as_str() {
        "mixed" => Scenario::mixed(),
        "phase-shift" => Scenario::phase_shift(),
        "no-balloon" => Scenario::no_balloon(),
        "identical" => Scenario::identical(),
        "steady" => Scenario::steady(),
        _ => Scenario::four_vms(),
    };
    let p = match std::env::var("POL").as_deref() {
        Ok("balloon") => RunPolicy::balloon_only(),
        Ok("swap") => RunPolicy::swap_only(),
        _ => RunPolicy::memvisor(),
    };
    let r = run_with(&s, &p, |sim, st, d| {
        if sim.tick < 40 || !d.is_empty() {
            let vms: Vec<String> = sim
                .vms
                .iter()
                .map(|v| {
                    let id = &v.spec.as_ref().unwrap().id;
                    let rep = st.vm(id).copied().unwrap_or_default();
                    format!(
                        "{id}:c{} a{} t{} ws{} {}",
                        v.charged_mib(),
                        rep.alloc_mib,
                        rep.target_mib,
                        rep.working_set_mib,
                        if rep.pressed {
                            format!(
                                "P{:.0}/{:.0}/{:.0}",
                                rep.major_faults_per_s,
                                rep.swap_in_kib_per_s,
                                rep.host_swap_faults_per_s
                            )
                        } else {
                            String::new()
                        }
                    )
                })
                .collect();
            println!(
                "t{} {:?} charged {} | {}",
                sim.tick,
                st.host_state(),
                sim.charged_mib(),
                vms.join(" ")
            );
            for d in d {
                println!(
                    "    {} {:?} {}->{} {:?}",
                    d.vm, d.action, d.from, d.to, d.reason.rule
                );
            }
        }
    });
    println!("{r:?}");
}
