// kv_append: stores k and v rows [rows, n_kv_heads, head_dim] at positions pos0.. of a
// sequence's paged cache. Cache layout [block][KV_BLOCK][kv_head][head_dim]; position p lives in
// block table[p / KV_BLOCK], slot p % KV_BLOCK. One thread per pair of values of a row (the row
// width is even), writing the pair into K and V: as one u32 of two f16 (pack2x16float, element
// 2j in the low half) or as two f32 words (override KV_F16). Override ROWS: the rows of many
// sequences (attention_decode.wgsl's ROWS): row r at position table[r] of the blocks at
// table[table[rows + r]].

struct Params {
    rows: u32,
    n_kv_heads: u32,
    head_dim: u32,
    pos0: u32,
    kv_f16: u32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

const KV_BLOCK: u32 = 16u;
override KV_F16: bool = true;
override ROWS: bool = false;
override WG: u32 = 256u;

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read_write> k_cache: array<u32>;
@group(0) @binding(2) var<storage, read_write> v_cache: array<u32>;
@group(0) @binding(3) var<storage, read> table: array<u32>;
@group(0) @binding(4) var<storage, read> k: array<vec2<f32>>;
@group(0) @binding(5) var<storage, read> v: array<vec2<f32>>;

@compute @workgroup_size(WG)
fn main(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let g = (wg.y * nwg.x + wg.x) * WG + lid;
    let pairs = params.n_kv_heads * params.head_dim / 2u;
    if (g >= params.rows * pairs) {
        return;
    }
    let r = g / pairs;
    let j = g % pairs;
    var pos = params.pos0 + r;
    var blocks = 0u;
    if (ROWS) {
        pos = table[r];
        blocks = table[params.rows + r];
    }
    let slot = table[blocks + pos / KV_BLOCK] * KV_BLOCK + pos % KV_BLOCK;
    let kp = k[g];
    let vp = v[g];
    if (KV_F16) {
        let word = slot * pairs + j;
        k_cache[word] = pack2x16float(kp);
        v_cache[word] = pack2x16float(vp);
    } else {
        let word = (slot * pairs + j) * 2u;
        k_cache[word] = bitcast<u32>(kp.x);
        k_cache[word + 1u] = bitcast<u32>(kp.y);
        v_cache[word] = bitcast<u32>(vp.x);
        v_cache[word + 1u] = bitcast<u32>(vp.y);
    }
}
