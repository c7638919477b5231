"""The store's Lua scripts: every multi-step change to Redis is one of these (see store.py)."""

from __future__ import annotations

from typing import Final

# Appends for one or more tasks in one call. KEYS: (task, events) per batch. ARGV: retention_s,
# channel, then per batch: task_id, batch id ('' for none), n_fields, field pairs..., n_entries,
# (count, blob) pairs..., and the terminal state of the batch's last event ('' for none: only the last
# event of a batch can be terminal). A blob is `count` consecutive events joined as
# `name US data US name US data ...`; each becomes one log entry `{n: count, b: blob}` with id
# `0-(first seq + 1)`, so no work here is per event. Returns per batch the new last seq, -1 if already
# terminal, -2 if unknown. A batch id already applied (a retry whose first try landed but whose reply
# was lost) writes nothing and returns the seq as it stands. The record fields are set only when the
# batch is written (a terminal `error`'s payload comes as the field `error`). One PUBLISH for the whole
# call: the parts `task_id US first US blob US blob ...` (= `task_id US first (US name US data)*`) of
# the batches that wrote something, joined by RS (\30).
APPEND: Final = """
local out, parts = {}, {}
local a = 3
for b = 1, #KEYS / 2 do
  local task, log = KEYS[2 * b - 1], KEYS[2 * b]
  local batch = ARGV[a + 1]
  local nf = tonumber(ARGV[a + 2])
  local ne = tonumber(ARGV[a + 3 + 2 * nf])
  local e0 = a + 4 + 2 * nf
  local final = ARGV[e0 + 2 * ne]
  local t = redis.call('HMGET', task, 'terminal', 'seq', 'batch')
  if not t[1] then out[b] = -2
  elseif batch ~= '' and t[3] == batch then out[b] = tonumber(t[2])
  elseif t[1] == '1' then out[b] = -1
  else
    local seq = tonumber(t[2])
    local first = seq + 1
    if nf > 0 then redis.call('HSET', task, unpack(ARGV, a + 3, a + 2 + 2 * nf)) end
    local msg = {ARGV[a], first}
    for i = e0, e0 + 2 * ne - 2, 2 do
      redis.call('XADD', log, '0-' .. (seq + 2), 'n', ARGV[i], 'b', ARGV[i + 1])
      seq = seq + tonumber(ARGV[i])
      msg[#msg + 1] = ARGV[i + 1]
    end
    if final ~= '' and ne > 0 then
      redis.call('HSET', task, 'terminal', '1', 'state', final)
      redis.call('EXPIRE', task, ARGV[1])
      redis.call('EXPIRE', log, ARGV[1])
    end
    if batch ~= '' then redis.call('HSET', task, 'seq', seq, 'batch', batch)
    else redis.call('HSET', task, 'seq', seq) end
    if seq >= first then parts[#parts + 1] = table.concat(msg, '\\31') end
    out[b] = seq
  end
  a = e0 + 2 * ne + 1
end
if #parts > 0 then redis.call('PUBLISH', ARGV[2], table.concat(parts, '\\30')) end
return out
"""

# Claim the queued task for dispatch unless it ended meanwhile ({}); returns the record (KEYS: task).
# Admission writes the record, `started` and the queue entry in one step (ADMIT), so a queued id
# always has its record.
MARK_RUNNING: Final = """
local t = redis.call('HGET', KEYS[1], 'terminal')
if t ~= '0' then return {} end
redis.call('HSET', KEYS[1], unpack(ARGV))
return redis.call('HGETALL', KEYS[1])
"""

# Terminal error written by a non-engine writer (cancel, sweeper, eviction, deadline): the payload's
# tokens_out comes from the record inside the script, so it can never disagree with the tokens already
# in the log. Returns {previous_state, pool_manager} or {'', ''} when unknown; previous_state is the
# terminal state when the task had already ended (nothing written then).
TERMINATE: Final = """
local t = redis.call('HMGET', KEYS[1], 'terminal', 'seq', 'state', 'tokens_out', 'manager')
if not t[1] then return {'', ''} end
if t[1] == '1' then return {t[3], t[5] or ''} end
local payload = cjson.decode(ARGV[3])
payload['tokens_out'] = tonumber(t[4] or '0')
local data = cjson.encode(payload)
local seq = tonumber(t[2]) + 1
redis.call('XADD', KEYS[2], '0-' .. (seq + 1), 'e', 'error', 'd', data)
redis.call('HSET', KEYS[1], 'terminal', '1', 'state', ARGV[2], 'seq', seq, 'error', data)
redis.call('EXPIRE', KEYS[1], ARGV[1])
redis.call('EXPIRE', KEYS[2], ARGV[1])
redis.call('PUBLISH', ARGV[4], table.concat({ARGV[5], seq, 'error', data}, '\\31'))
return {t[3], t[5] or ''}
"""

# The queue of one replica set. KEYS (all tagged {rs}): q:interactive, q:batch, qseq, qage (admitted
# epoch ms), qdl (deadline epoch ms), lease, evicted. Scores of q:* are the set's admission sequence.

# Admission in one step: the id check, the capacity check with drop-lru eviction, the record, its
# `started` event (seq 0) and the queue entry. A crash before it leaves nothing; after it, a complete
# queued task. KEYS: task, events, then the seven queue keys above; on a single Redis (not a cluster,
# where they live in other slots) also the id's locator and the recent-tasks index, which an admitted
# task then gets in the same step instead of in two more round trips.
# ARGV: ttl_s, task_id, priority, capacity, class capacity, policy, now_ms, deadline_at_ms,
# first position of the `started` window, window size n, locator TTL ('': leave the locator alone)
# and value (the set), recent-index member, its score and the index's bound (member '': no index
# write), n encoded `started` payloads (one per position from the first; a position outside the
# window takes the nearest), then the record's field pairs.
# Returns {status, position, depth_interactive, depth_batch, evicted_task_id or ''} with status ok,
# exists (the id is still known) or full: the class cap is full, or the queue is full and the policy
# (reject, or drop-lru with no queued batch task) leaves nothing to displace. Under drop-lru the oldest
# queued batch task is evicted; it is parked in `evicted` for 10 s, so if the caller dies before
# ending it the sweeper does.
# No live message: nobody can follow a task before its admission answers (a stream of an id not yet
# admitted is 404), and a stream that does meet `started` late reads it from the log (the feed's gap
# check). A PUBLISH per admission cost every gateway a message it only threw away (issue 16).
ADMIT: Final = """
if redis.call('EXISTS', KEYS[1]) == 1 then return {'exists', -1, 0, 0, ''} end
local ni = redis.call('ZCARD', KEYS[3])
local nb = redis.call('ZCARD', KEYS[4])
local batch = ARGV[3] == 'batch'
local mine = ni
if batch then mine = nb end
-- A class cap below the capacity is a hard limit (it never evicts); one equal to it is the
-- capacity itself, where drop-lru applies.
local cap, ccap = tonumber(ARGV[4]), tonumber(ARGV[5])
if mine >= ccap and ccap < cap then return {'full', -1, ni, nb, ''} end
local evicted = ''
if ni + nb >= cap then
  if ARGV[6] ~= 'drop-lru' or nb == 0 then return {'full', -1, ni, nb, ''} end
  evicted = redis.call('ZPOPMIN', KEYS[4])[1]
  redis.call('ZREM', KEYS[6], evicted)
  redis.call('ZREM', KEYS[7], evicted)
  redis.call('ZADD', KEYS[9], tonumber(ARGV[7]) + 10000, evicted)
  nb = nb - 1
end
local position = ni
if batch then position = ni + nb end
local first, n = tonumber(ARGV[9]), tonumber(ARGV[10])
local started = ARGV[16 + math.min(math.max(position - first, 0), n - 1)]
redis.call('HSET', KEYS[1], 'terminal', '0', 'seq', 0, 'tokens_out', '0', unpack(ARGV, 16 + n))
redis.call('EXPIRE', KEYS[1], ARGV[1])
redis.call('XADD', KEYS[2], '0-1', 'e', 'started', 'd', started)
redis.call('EXPIRE', KEYS[2], ARGV[1])
local seq = redis.call('INCR', KEYS[5])
redis.call('ZADD', KEYS[6], ARGV[7], ARGV[2])
redis.call('ZADD', KEYS[7], ARGV[8], ARGV[2])
if batch then
  redis.call('ZADD', KEYS[4], seq, ARGV[2])
  nb = nb + 1
else
  redis.call('ZADD', KEYS[3], seq, ARGV[2])
  ni = ni + 1
end
if ARGV[11] ~= '' then redis.call('SET', KEYS[10], ARGV[12], 'EX', ARGV[11]) end
if ARGV[13] ~= '' then
  redis.call('ZADD', KEYS[11], ARGV[14], ARGV[13])
  redis.call('ZREMRANGEBYRANK', KEYS[11], 0, -tonumber(ARGV[15]) - 1)
end
return {'ok', position, ni, nb, evicted}
"""

# ARGV: lease expiry (epoch ms), at most n, max_batch_wait_ms (0: no aging), now_ms.
# Strict priority, FIFO per class; with aging, a batch head older than the wait is ordered as
# interactive by its admission sequence. Returns flat {task_id, score, priority, admitted, deadline, ...}.
CLAIM: Final = """
local out = {}
local wait = tonumber(ARGV[3])
for _ = 1, tonumber(ARGV[2]) do
  local hi = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  local hb = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
  if #hi == 0 and #hb == 0 then break end
  local take = hi
  local prio = 'interactive'
  if #hi == 0 then
    take, prio = hb, 'batch'
  elseif #hb > 0 and wait > 0 and tonumber(hb[2]) < tonumber(hi[2]) then
    local admitted = tonumber(redis.call('ZSCORE', KEYS[4], hb[1]) or ARGV[4])
    if admitted <= tonumber(ARGV[4]) - wait then take, prio = hb, 'batch' end
  end
  if prio == 'batch' then redis.call('ZREM', KEYS[2], take[1]) else redis.call('ZREM', KEYS[1], take[1]) end
  out[#out + 1] = take[1]
  out[#out + 1] = take[2]
  out[#out + 1] = prio
  out[#out + 1] = redis.call('ZSCORE', KEYS[4], take[1]) or ARGV[4]
  out[#out + 1] = redis.call('ZSCORE', KEYS[5], take[1]) or '+inf'
  redis.call('ZREM', KEYS[4], take[1])
  redis.call('ZREM', KEYS[5], take[1])
  redis.call('ZADD', KEYS[6], ARGV[1], take[1])
end
return out
"""

# ARGV: task_id, priority, score, admitted_ms, deadline_ms: put a claimed task back where it was.
REQUEUE: Final = """
if ARGV[2] == 'batch' then redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
else redis.call('ZADD', KEYS[1], ARGV[3], ARGV[1]) end
redis.call('ZADD', KEYS[4], ARGV[4], ARGV[1])
redis.call('ZADD', KEYS[5], ARGV[5], ARGV[1])
redis.call('ZREM', KEYS[6], ARGV[1])
return 1
"""

# ARGV: task_id. Remove a queued task (cancel, deadline); returns 1 if it was queued.
DEQUEUE: Final = """
local n = redis.call('ZREM', KEYS[1], ARGV[1]) + redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[4], ARGV[1])
redis.call('ZREM', KEYS[5], ARGV[1])
return n
"""

# A queued `metrics` frame, written only while the task is still queued (KEYS: task, events; ARGV: data,
# channel, task_id): a frame computed just before a dispatch must not land after the dispatch event.
QUEUED_FRAME: Final = """
local t = redis.call('HMGET', KEYS[1], 'terminal', 'seq', 'state')
if t[1] ~= '0' or t[3] ~= 'queued' then return -1 end
local seq = tonumber(t[2]) + 1
redis.call('XADD', KEYS[2], '0-' .. (seq + 1), 'e', 'metrics', 'd', ARGV[1])
redis.call('HSET', KEYS[1], 'seq', seq)
redis.call('PUBLISH', ARGV[2], table.concat({ARGV[3], seq, 'metrics', ARGV[1]}, '\\31'))
return seq
"""

# Sessions (SPEC §5.4). KEYS: sess. Budgets are remaining amounts (b_tokens, b_time ms, b_cost in
# micro-units, absent = unlimited); each admitted task holds a reservation `r:<task_id>` =
# "<tokens>|<cost>" until SESSION_SETTLE refunds what it did not use, exactly once.
# ARGV: model_ref, ttl_ms, max_turns, now_ms, task_id, tokens, cost, then the initial budgets
# (tokens, time_ms, cost; '' = unlimited) used only when this task creates the session.
# Returns {'ok', turns, b_tokens, b_time, b_cost} (false for unlimited) or {refusal, detail}.
SESSION_ADMIT: Final = """
local s = KEYS[1]
local created = redis.call('EXISTS', s) == 0
if created then
  redis.call('HSET', s, 'model_ref', ARGV[1], 'created_ms', ARGV[4], 'turns', 0, 'max_turns', ARGV[3],
    'replica_id', '')
  if ARGV[8] ~= '' then redis.call('HSET', s, 'b_tokens', ARGV[8]) end
  if ARGV[9] ~= '' then redis.call('HSET', s, 'b_time', ARGV[9]) end
  if ARGV[10] ~= '' then redis.call('HSET', s, 'b_cost', ARGV[10]) end
end
local v = redis.call('HMGET', s, 'model_ref', 'turns', 'max_turns', 'b_tokens', 'b_time', 'b_cost')
local refusal = nil
if v[1] ~= ARGV[1] then refusal = {'model', v[1]}
elseif tonumber(v[2]) >= tonumber(v[3]) then refusal = {'turns', v[3]}
elseif v[4] and tonumber(v[4]) < tonumber(ARGV[6]) then refusal = {'tokens', v[4]}
elseif v[6] and tonumber(v[6]) < tonumber(ARGV[7]) then refusal = {'cost', v[6]}
elseif v[5] and tonumber(v[5]) <= 0 then refusal = {'time_ms', v[5]} end
if refusal then
  if created then redis.call('DEL', s) end
  return refusal
end
local turns = redis.call('HINCRBY', s, 'turns', 1)
local tokens = v[4] and redis.call('HINCRBY', s, 'b_tokens', -tonumber(ARGV[6])) or false
local cost = v[6] and redis.call('HINCRBY', s, 'b_cost', -tonumber(ARGV[7])) or false
redis.call('HSET', s, 'r:' .. ARGV[5], ARGV[6] .. '|' .. ARGV[7])
redis.call('PEXPIRE', s, ARGV[2])
return {'ok', turns, tokens, v[5] or false, cost}
"""

# ARGV: task_id, used tokens, used cost, time_ms, ttl_ms, undo ('1': the admission was refused after
# the reservation, so the turn is given back too). Use beyond the reservation is not charged; time
# never goes below 0; `tokens_held` (what the engine's cache now holds for the session) becomes the used
# tokens. Returns 1 when a reservation was settled, 0 when none was left.
SESSION_SETTLE: Final = """
local key = 'r:' .. ARGV[1]
local r = redis.call('HGET', KEYS[1], key)
if not r then return 0 end
redis.call('HDEL', KEYS[1], key)
local sep = string.find(r, '|', 1, true)
local tokens = tonumber(string.sub(r, 1, sep - 1))
local cost = tonumber(string.sub(r, sep + 1))
local v = redis.call('HMGET', KEYS[1], 'b_tokens', 'b_time', 'b_cost')
if v[1] then redis.call('HINCRBY', KEYS[1], 'b_tokens', tokens - math.min(tokens, tonumber(ARGV[2]))) end
if v[3] then redis.call('HINCRBY', KEYS[1], 'b_cost', cost - math.min(cost, tonumber(ARGV[3]))) end
if v[2] then redis.call('HSET', KEYS[1], 'b_time', math.max(0, tonumber(v[2]) - tonumber(ARGV[4]))) end
if ARGV[6] == '1' then redis.call('HINCRBY', KEYS[1], 'turns', -1) end
if tonumber(ARGV[2]) > 0 then redis.call('HSET', KEYS[1], 'tokens_held', ARGV[2]) end
redis.call('PEXPIRE', KEYS[1], ARGV[5])
return 1
"""

# Set fields of a session that still exists (never recreate an expired one) and return all of them
# ({} when it is gone). ARGV: field pairs.
SESSION_SET: Final = """
if redis.call('EXISTS', KEYS[1]) == 0 then return {} end
redis.call('HSET', KEYS[1], unpack(ARGV))
return redis.call('HGETALL', KEYS[1])
"""

# Delete a session and return what it held ({} when unknown). KEYS: sess.
SESSION_DELETE: Final = """
local fields = redis.call('HGETALL', KEYS[1])
redis.call('DEL', KEYS[1])
return fields
"""
