// rope_kv_append: rope.wgsl and kv_append.wgsl in one dispatch. Rotates q[rows, n_heads,
// head_dim] and k[rows, n_kv_heads, head_dim] in place (HF half-split RoPE: for i < head_dim / 2,
// (x[i], x[i + half]) is turned by the angle f32(pos) * inv_freq[i], row r at pos0 + r, cos and
// sin scaled by attn_scale) and stores the rotated k and v rows at positions pos0.. of the
// sequence's paged cache ([block][KV_BLOCK][kv_head][head_dim]; position p in block
// table[p / KV_BLOCK], slot p % KV_BLOCK), as f16 pairs packed in a u32 or as f32 (override
// KV_F16). One thread per (row, head of q then k, pair i = 2j, 2j + 1 of the first half): it
// owns elements i, i + 1, i + half, i + half + 1 of its head, so with head_dim a multiple of 4
// every cache word it writes is its own (the host falls back to rope + kv_append otherwise).
// Angles are reduced to [-pi, pi] exactly as in rope.wgsl.

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

const KV_BLOCK: u32 = 16u;
override KV_F16: bool = true;
override WG: u32 = 256u;

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read_write> q: array<f32>;
@group(0) @binding(2) var<storage, read_write> k: array<f32>;
@group(0) @binding(3) var<storage, read_write> k_cache: array<u32>;
@group(0) @binding(4) var<storage, read_write> v_cache: array<u32>;
@group(0) @binding(5) var<storage, read> table: array<u32>;
@group(0) @binding(6) var<storage, read> v: array<f32>;
@group(0) @binding(7) var<storage, read> inv_freq: array<f32>;

const INV_TWO_PI: f32 = 0.15915494309189535;
// 2*pi = TWO_PI_A + TWO_PI_B + TWO_PI_C (201/32, 127/65536, the f32 rest).
const TWO_PI_A: f32 = 6.28125;
const TWO_PI_B: f32 = 0.0019378662109375;
const TWO_PI_C: f32 = -2.5590313e-6;

fn reduce_angle(a: f32) -> f32 {
    let turns = round(a * INV_TWO_PI);
    return ((a - turns * TWO_PI_A) - turns * TWO_PI_B) - turns * TWO_PI_C;
}

// (cos, sin) * attn_scale of pair i at position pos.
fn turn(pos: u32, i: u32) -> vec2<f32> {
    let angle = reduce_angle(f32(pos) * inv_freq[i]);
    return vec2<f32>(cos(angle), sin(angle)) * params.attn_scale;
}

// Elements (i, i + 1) and (i + half, i + half + 1) of x rotated: (first pair, second pair).
fn rotate(lo: vec2<f32>, hi: vec2<f32>, c0: vec2<f32>, c1: vec2<f32>) -> array<vec2<f32>, 2> {
    let c = vec2<f32>(c0.x, c1.x);
    let s = vec2<f32>(c0.y, c1.y);
    return array<vec2<f32>, 2>(lo * c - hi * s, hi * c + lo * s);
}

// Stores elements e, e + 1 (e even) of a slot's row into a cache.
fn put_k(e: u32, val: vec2<f32>) {
    if (KV_F16) {
        k_cache[e / 2u] = pack2x16float(val);
    } else {
        k_cache[e] = bitcast<u32>(val.x);
        k_cache[e + 1u] = bitcast<u32>(val.y);
    }
}

fn put_v(e: u32, val: vec2<f32>) {
    if (KV_F16) {
        v_cache[e / 2u] = pack2x16float(val);
    } else {
        v_cache[e] = bitcast<u32>(val.x);
        v_cache[e + 1u] = bitcast<u32>(val.y);
    }
}

@compute @workgroup_size(WG)
fn main(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let g = (wg.y * nwg.x + wg.x) * WG + lid;
    let hd = params.head_dim;
    let half = hd / 2u;
    let quarter = hd / 4u;
    let heads = params.n_heads + params.n_kv_heads;
    if (g >= params.rows * heads * quarter) {
        return;
    }
    let i = 2u * (g % quarter);
    let h = (g / quarter) % heads;
    let r = g / (quarter * heads);
    let pos = params.pos0 + r;
    let c0 = turn(pos, i);
    let c1 = turn(pos, i + 1u);
    if (h < params.n_heads) {
        let b = (r * params.n_heads + h) * hd + i;
        let t = rotate(vec2<f32>(q[b], q[b + 1u]), vec2<f32>(q[b + half], q[b + half + 1u]), c0, c1);
        q[b] = t[0].x;
        q[b + 1u] = t[0].y;
        q[b + half] = t[1].x;
        q[b + half + 1u] = t[1].y;
        return;
    }
    let kvh = h - params.n_heads;
    let b = (r * params.n_kv_heads + kvh) * hd + i;
    let t = rotate(vec2<f32>(k[b], k[b + 1u]), vec2<f32>(k[b + half], k[b + half + 1u]), c0, c1);
    k[b] = t[0].x;
    k[b + 1u] = t[0].y;
    k[b + half] = t[1].x;
    k[b + half + 1u] = t[1].y;
    let slot = table[pos / KV_BLOCK] * KV_BLOCK + pos % KV_BLOCK;
    let e = (slot * params.n_kv_heads + kvh) * hd + i;
    put_k(e, t[0]);
    put_k(e + half, t[1]);
    put_v(e, vec2<f32>(v[b], v[b + 1u]));
    put_v(e + half, vec2<f32>(v[b + half], v[b + half + 1u]));
}
