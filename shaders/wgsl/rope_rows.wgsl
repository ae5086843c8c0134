// rope_rows: rotates x[rows, n_heads, head_dim] in place, row r at position pos[r] (a batch of
// many sequences' rows, or packed training sequences), HF half-split convention as in
// rope.wgsl: (x[i], x[i + half]) turned by f32(pos) * inv_freq[i], the angle reduced to
// [-pi, pi] first, cos and sin scaled by attn_scale. One thread per (row, head, i < half).

struct Params {
    rows: u32,
    n_heads: u32,
    n_kv_heads: u32,
    head_dim: u32,
    pos0: u32,
    attn_scale: f32,
    _pad0: u32,
    _pad1: u32,
}

override WG: u32 = 256u;

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read_write> x: array<f32>;
@group(0) @binding(2) var<storage, read> inv_freq: array<f32>;
@group(0) @binding(3) var<storage, read> pos: array<u32>;

const INV_TWO_PI: f32 = 0.15915494309189535;
// 2*pi = TWO_PI_A + TWO_PI_B + TWO_PI_C (201/32, 127/65536, the f32 rest).
const TWO_PI_A: f32 = 6.28125;
const TWO_PI_B: f32 = 0.0019378662109375;
const TWO_PI_C: f32 = -2.5590313e-6;

fn reduce_angle(a: f32) -> f32 {
    let turns = round(a * INV_TWO_PI);
    return ((a - turns * TWO_PI_A) - turns * TWO_PI_B) - turns * TWO_PI_C;
}

@compute @workgroup_size(WG)
fn main(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let g = (wg.y * nwg.x + wg.x) * WG + lid;
    let half = params.head_dim / 2u;
    if (g >= params.rows * params.n_heads * half) {
        return;
    }
    let i = g % half;
    let head = g / half;
    let r = head / params.n_heads;
    let angle = reduce_angle(f32(pos[r]) * inv_freq[i]);
    let c = cos(angle) * params.attn_scale;
    let s = sin(angle) * params.attn_scale;
    let b = head * params.head_dim + i;
    let x1 = x[b];
    let x2 = x[b + half];
    x[b] = x1 * c - x2 * s;
    x[b + half] = x2 * c + x1 * s;
}
