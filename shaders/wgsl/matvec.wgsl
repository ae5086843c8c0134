// matvec: the decode mat-vec (1-4 input rows per grid row), out[r, col0 + o] = x[r] . w[o] with
// f32 accumulation. Not a shader on its own: it is appended to matmul.wgsl, matmul_f16.wgsl and
// matmul_quant.wgsl, which supply Params, `out`, x_quad(m, e) (x[m, e..e+4], zero past the rows
// or k) and w_octet(f, e) (weights e..e+8 of feature f, widened to f32, zero past k).
// matvec_subgroup.wgsl, appended after this file where the adapter has subgroups, holds the
// entry point those adapters use; `matvec` below is the portable one.
//
// Decode reads every weight once and does 2 flops per weight (per row): its speed is the
// weight stream's bandwidth, so the layout serves the loads.
//   - A team of TEAM threads (32) owns one output feature; TEAMS teams make a 256-thread
//     workgroup, so a workgroup covers TEAMS features and grid y picks 4 input rows.
//   - Each lane walks the row in octets of 8 weights (one 16-byte load for 16-bit weights, two
//     for f32; a few unaligned words for the block formats). A step takes FOUR octets per lane,
//     TEAM octets apart, all loaded before any is used: four independent 16-byte loads in flight
//     per lane, each of the four coalesced across the team into 512 contiguous bytes. One load at
//     a time leaves each lane waiting a full memory latency per 16 bytes, which caps bandwidth
//     well below the peak unless very many teams run at once (matrices with few outputs, such
//     as a GQA key projection, launch few). A step covers 32 * TEAM weights (1024); the rest of
//     a row (k not a multiple of that, and all of a short row) goes octet by octet.
//   - Each octet feeds up to 4 input rows, so the weights are read once for 4 rows.
//   - The team's partial sums meet at the end: here through workgroup memory (one barrier, then
//     the team's first lane adds its TEAM partials); with subgroups, through subgroupAdd.
// x is not staged in workgroup memory: every team re-reads the same x rows (4 x k floats, up to
// 229 KB at k = 14336, more than workgroup memory holds), which the cache serves; staging would
// add a copy and a barrier to every workgroup for reads that already hit the cache. Several
// features per team would keep more lanes busy only on rows shorter than the team's stride
// (k < 256), which occur in small models whose decode is bound by launches, not by the
// weight stream.

override TEAM: u32 = 32u;
override TEAMS: u32 = 8u;

var<workgroup> partial: array<vec4<f32>, TEAM * TEAMS>;

// The octet's dot product with x[m, e..e+8] (zero for rows past the matrix).
fn row_dot(wv: array<vec4<f32>, 2>, m: u32, e: u32) -> f32 {
    return dot(wv[0], x_quad(m, e)) + dot(wv[1], x_quad(m, e + 4u));
}

// The octet's dot products with rows r0..r0+4 of x.
fn octet_dots(wv: array<vec4<f32>, 2>, r0: u32, e: u32) -> vec4<f32> {
    return vec4<f32>(row_dot(wv, r0, e), row_dot(wv, r0 + 1u, e), row_dot(wv, r0 + 2u, e), row_dot(wv, r0 + 3u, e));
}

// This lane's share of feature o for input rows r0..r0+4 (zero when o is past the matrix, so
// that every lane of a team can take part in the reduction).
fn lane_sums(o: u32, r0: u32, lane: u32) -> vec4<f32> {
    var acc = vec4<f32>(0.0);
    if (o >= params.n) {
        return acc;
    }
    let k = params.k;
    let stride = 8u * TEAM;
    var e = 8u * lane;
    for (; e + 3u * stride < k; e += 4u * stride) {
        let w0 = w_octet(o, e);
        let w1 = w_octet(o, e + stride);
        let w2 = w_octet(o, e + 2u * stride);
        let w3 = w_octet(o, e + 3u * stride);
        acc += (octet_dots(w0, r0, e) + octet_dots(w1, r0, e + stride))
            + (octet_dots(w2, r0, e + 2u * stride) + octet_dots(w3, r0, e + 3u * stride));
    }
    for (; e < k; e += stride) {
        acc += octet_dots(w_octet(o, e), r0, e);
    }
    return acc;
}

// Writes feature o of rows r0..r0+4 (those inside the matrix).
fn store_rows(o: u32, r0: u32, t: vec4<f32>) {
    let nr = min(params.rows - r0, 4u);
    let b = r0 * params.out_stride + params.col0 + o;
    for (var i = 0u; i < nr; i++) {
        out[b + i * params.out_stride] = t[i];
    }
}

@compute @workgroup_size(TEAM * TEAMS)
fn matvec(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let lane = lid % TEAM;
    let o = wg.x * TEAMS + lid / TEAM;
    let r0 = wg.y * 4u;
    partial[lid] = lane_sums(o, r0, lane);
    workgroupBarrier();
    if (lane == 0u && o < params.n) {
        var t = partial[lid];
        for (var i = 1u; i < TEAM; i++) {
            t += partial[lid + i];
        }
        store_rows(o, r0, t);
    }
}
