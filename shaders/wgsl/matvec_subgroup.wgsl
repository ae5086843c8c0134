// matvec_subgroup: the decode mat-vec of matvec.wgsl for adapters with subgroup operations
// (wgpu's SUBGROUP feature), appended after it: the same teams and loads (lane_sums), but the
// team's partial sums meet through subgroup operations instead of workgroup memory, so a
// workgroup whose subgroups are at least TEAM wide runs without a barrier.
// Subgroup sizes differ by device (4 to 128: 32 on NVIDIA and Apple, 32 or 64 on AMD, 8 to 32
// on Intel, 8 on lavapipe), so threads are numbered subgroup by subgroup (subgroup_id,
// subgroup_invocation_id; 256 threads are whole subgroups of any size), which makes every team
// either a TEAM-aligned part of one subgroup or a run of whole subgroups:
//   subgroup == TEAM: subgroupAdd sums the team;
//   subgroup >  TEAM: several teams share a subgroup: butterfly shuffles (XOR of lane bits
//                     below TEAM) sum within each team without crossing into the next;
//   subgroup <  TEAM: subgroupAdd sums each subgroup, then the team's first lane adds its
//                     TEAM / subgroup sums through workgroup memory (one barrier).

@compute @workgroup_size(TEAM * TEAMS)
fn matvec_subgroup(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(subgroup_id) sg_id: u32,
    @builtin(subgroup_size) sg_size: u32,
    @builtin(subgroup_invocation_id) sg_lane: u32,
) {
    let v = sg_id * sg_size + sg_lane;
    let lane = v % TEAM;
    let team = v / TEAM;
    let o = wg.x * TEAMS + team;
    let r0 = wg.y * 4u;
    var t = lane_sums(o, r0, lane);
    if (sg_size <= TEAM) {
        t = subgroupAdd(t);
    } else {
        for (var m = TEAM / 2u; m > 0u; m >>= 1u) {
            t += subgroupShuffleXor(t, m);
        }
    }
    if (sg_size < TEAM) {
        let per_team = TEAM / sg_size;
        if (sg_lane == 0u) {
            partial[sg_id] = t;
        }
        workgroupBarrier();
        if (lane == 0u) {
            t = partial[team * per_team];
            for (var i = 1u; i < per_team; i++) {
                t += partial[team * per_team + i];
            }
        }
    }
    if (lane == 0u && o < params.n) {
        store_rows(o, r0, t);
    }
}
