// rope: rotates q[rows, n_heads, head_dim] and k[rows, n_kv_heads, head_dim] in place, HF
// half-split convention: for i < head_dim / 2, (x[i], x[i + half]) is turned by the angle
// f32(pos) * inv_freq[i], row r at pos0 + r; cos and sin are scaled by attn_scale.
// One thread per (row, head of q then k, i) over a 2D grid of 1D workgroups. The angle grows
// to thousands of radians, where GPU sin/cos lose accuracy, so it is first reduced to
// [-pi, pi] with a two-part 2*pi (Cody-Waite) and fma.

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
@group(0) @binding(1) var<storage, read_write> q: array<f32>;
@group(0) @binding(2) var<storage, read_write> k: array<f32>;
@group(0) @binding(3) var<storage, read> inv_freq: array<f32>;

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
    let heads = params.n_heads + params.n_kv_heads;
    if (g >= params.rows * heads * half) {
        return;
    }
    let i = g % half;
    let h = (g / half) % heads;
    let r = g / (half * heads);
    let angle = reduce_angle(f32(params.pos0 + r) * inv_freq[i]);
    let c = cos(angle) * params.attn_scale;
    let s = sin(angle) * params.attn_scale;
    if (h < params.n_heads) {
        let b = (r * params.n_heads + h) * params.head_dim + i;
        let x1 = q[b];
        let x2 = q[b + half];
        q[b] = x1 * c - x2 * s;
        q[b + half] = x2 * c + x1 * s;
    } else {
        let b = (r * params.n_kv_heads + h - params.n_heads) * params.head_dim + i;
        let x1 = k[b];
        let x2 = k[b + half];
        k[b] = x1 * c - x2 * s;
        k[b + half] = x2 * c + x1 * s;
    }
}
