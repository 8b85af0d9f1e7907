"""Near-duplicate lookup in Redis without reading the pool: MinHash and LSH bands.

A scenario's word shingles get `BANDS * ROWS` MinHash values; each band of `ROWS` values
is hashed into a bucket, a Redis set of the task ids that fell into it. Two scenarios with
Jaccard similarity s share at least one bucket with probability 1 - (1 - s^ROWS)^BANDS:
at 20 bands of 4 rows, more than 0.99999 at s = 0.85 (the default threshold), 0.996 at
0.7, 0.94 at 0.6, and 0.002 at 0.1 (typical of two unrelated retail tasks). Only the
tasks in the proposal's buckets are compared exactly, so a lookup costs its candidates,
not the pool. Thresholds much below 0.6 lose recall: the bands were sized for high ones.

`CHECK_AND_CLAIM` runs the whole check, and the claim when asked, as one Lua script: the
signature in a hash (one HGET), then exact Jaccard on the bucket candidates' stored
shingles. Redis runs a script atomically, so of two concurrent near-duplicates one is
accepted, with no lock held across round trips.
"""

from __future__ import annotations

import hashlib
import struct

BANDS, ROWS = 20, 4
VERSION = f"minhash-shake128-{BANDS}x{ROWS}-v1"  # kept beside the index: a change re-seeds
_VALUES = struct.Struct(f">{BANDS * ROWS}I")  # one 32-bit hash per MinHash function


def bands(shingles: frozenset[str]) -> list[str]:
    """The LSH bucket of each band: `band:digest`, the same in every process. Each shingle's
    SHAKE-128 output gives it BANDS * ROWS independent hash values in one call."""
    rows = [_VALUES.unpack(hashlib.shake_128(s.encode()).digest(_VALUES.size)) for s in shingles]
    mins = [min(column) for column in zip(*rows, strict=True)] if rows else [0] * _VALUES.size
    keys = [repr(mins[i * ROWS : (i + 1) * ROWS]).encode() for i in range(BANDS)]
    return [f"{i}:{hashlib.blake2b(k, digest_size=8).hexdigest()}" for i, k in enumerate(keys)]


# KEYS: signatures hash, scenarios hash, then the proposal's bucket sets.
# ARGV: signature, task id, shingles (JSON list, no repeats), threshold, "1" to claim.
# Returns the id of the task it duplicates, or nil (claimed, when asked).
CHECK_AND_CLAIM = """
local holder = redis.call('HGET', KEYS[1], ARGV[1])
if holder and holder ~= ARGV[2] then return holder end
local mine, size = {}, 0
for _, s in ipairs(cjson.decode(ARGV[3])) do
  if not mine[s] then mine[s] = true; size = size + 1 end
end
local threshold, seen = tonumber(ARGV[4]), {}
for i = 3, #KEYS do
  for _, other in ipairs(redis.call('SMEMBERS', KEYS[i])) do
    if other ~= ARGV[2] and not seen[other] then
      seen[other] = true
      local raw = redis.call('HGET', KEYS[2], other)
      if raw then
        local common, union = 0, size
        for _, s in ipairs(cjson.decode(raw)) do
          if mine[s] then common = common + 1 else union = union + 1 end
        end
        local similarity = 1
        if union > 0 then similarity = common / union end
        if similarity >= threshold then return other end
      end
    end
  end
end
if ARGV[5] == '1' then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
  redis.call('HSET', KEYS[2], ARGV[2], ARGV[3])
  for i = 3, #KEYS do redis.call('SADD', KEYS[i], ARGV[2]) end
end
return false
"""
