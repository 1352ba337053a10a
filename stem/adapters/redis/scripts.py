"""The Redis adapters' Lua scripts, in one place.

Every broker script touches the keys of ONE queue only, all passed in ``KEYS`` and all
sharing the queue's hash tag, so each runs in one slot (Redis Cluster-safe). KEYS
layout, always the same 16 keys (see ``broker.QueueKeys``; ``<queue>`` in a key is the
queue name with ``%``, ``:``, ``{`` and ``}`` percent-encoded):

====== ===================================================================
KEYS   key
====== ===================================================================
1..10  ``{ns:queue}:stream:<band>`` one stream per priority band 0..9
11     ``{ns:queue}:delayed``  ZSET, score = due (epoch ms), member
       ``"<band>:<visibility ms or empty>:<envelope JSON>"``
12     ``{ns:queue}:leases``   ZSET of leases longer than the idle horizon:
       member ``"<band>|<entry id>"``, score = deadline (epoch ms)
13     ``{ns:queue}:released`` ZSET of nacked entries waiting to be re-taken:
       member ``"<band>|<entry id>"``, score = band
14     ``{ns:queue}:dead``     dead-letter stream (fields p, r, t), capped at
       about ``dead_letter_max`` entries (``XADD MAXLEN ~``)
15     ``{ns:queue}:claim``    HASH band -> XAUTOCLAIM cursor
16     ``{ns:queue}:dead_trimmed`` counter: dead letters dropped by the cap
====== ===================================================================

Stream entries carry field ``p`` (the envelope bytes) and, when the envelope has
its own visibility timeout, ``v`` (milliseconds). Whatever ``v`` holds (entries may
be written by other programs: huge, negative, fractional, NaN), the fetch script
clamps it to ``MIN..MAX_VISIBILITY_TIMEOUT`` (NaN or not a number: the default) before
it reaches XCLAIM or ZADD, so no stored value can make a fetch fail.

Leases. A delivery's deadline is its last delivery time + the *idle horizon* H
(the broker's ``default_visibility_timeout``), so expiry is exactly what XAUTOCLAIM
with min-idle H finds. A shorter lease L is set by back-dating the delivery
(``XCLAIM ... IDLE H-L JUSTID``); a longer one is recorded in ``leases`` and the
claimer keeps such entries' idle time at 0 until their deadline, then claims them.

Ownership. Every call that settles a delivery (ack, nack, retry, dead-letter,
extend) first checks, with XPENDING, that the entry is still pending for the same
consumer with the same delivery count it was fetched with. A reclaim (XAUTOCLAIM,
XCLAIM) bumps the count, so a stale holder's late ack/retry is a no-op instead of
removing the new holder's delivery or forking the task into two lineages.
"""

from __future__ import annotations

from stem.limits import MAX_VISIBILITY_TIMEOUT, MIN_VISIBILITY_TIMEOUT

#: Consumer name that owns nacked entries until a fetch takes them again.
RELEASED = "stem:released"

# Helpers shared by the scripts. ARGV[1] is always the consumer group.
_PRELUDE = """
local G = ARGV[1]
local RELEASED = '__RELEASED__'

local function pending(band, id)
  return redis.call('XPENDING', KEYS[band + 1], G, id, id, 1)[1]
end

local function split(m)
  local bar = string.find(m, '|', 1, true)
  return tonumber(string.sub(m, 1, bar - 1)), string.sub(m, bar + 1)
end

-- variadic calls in chunks: Lua's unpack() has a stack limit
local function each_chunk(list, fn)
  for i = 1, #list, 1000 do
    fn(unpack(list, i, math.min(i + 999, #list)))
  end
end

-- A delivery is named by an item "<band> <entry id> <delivery count>" plus its
-- consumer. It is still held when the entry is pending for that consumer with
-- that count (a reclaim bumps the count; a nack hands it to RELEASED).
local function owned(band, id, consumer, count)
  local p = pending(band, id)
  return p and p[2] == consumer and p[4] == tonumber(count)
end

-- ARGV[first..] = consumer, "item;item;...", consumer, "item;..." ...
-- Calls fn(band, id, consumer) for held deliveries; returns '1'/'0' flags in order.
local function each_held(first, fn)
  local flags = {}
  for i = first, #ARGV, 2 do
    local consumer = ARGV[i]
    for band, id, count in string.gmatch(ARGV[i + 1], '(%d) ([^ ;]+) (%d+)') do
      band = tonumber(band)
      if owned(band, id, consumer, count) then
        fn(band, id, consumer)
        flags[#flags + 1] = '1'
      else
        flags[#flags + 1] = '0'
      end
    end
  end
  return table.concat(flags)
end

-- ARGV[first..] in groups of `stride`: item, consumer, then per-item arguments.
-- Calls fn(i, band, id) for held deliveries; returns '1'/'0' flags in order.
local function each_held_item(first, stride, fn)
  local flags = {}
  for i = first, #ARGV, stride do
    local band, id, count = string.match(ARGV[i], '^(%d) (%S+) (%d+)$')
    band = tonumber(band)
    if band and owned(band, id, ARGV[i + 1], count) then
      fn(i, band, id)
      flags[#flags + 1] = '1'
    else
      flags[#flags + 1] = '0'
    end
  end
  return table.concat(flags)
end

-- XACK + XDEL (acked entries are deleted so streams don't grow) + forget long leases.
local function finish(by_band)
  local longs = redis.call('EXISTS', KEYS[12]) == 1
  for band, ids in pairs(by_band) do
    local s = KEYS[band + 1]
    each_chunk(ids, function(...) redis.call('XACK', s, G, ...) end)
    each_chunk(ids, function(...) redis.call('XDEL', s, ...) end)
    if longs then
      local members = {}
      for j = 1, #ids do members[j] = band .. '|' .. ids[j] end
      each_chunk(members, function(...) redis.call('ZREM', KEYS[12], ...) end)
    end
  end
end

local function add_to(by_band, band, id)
  local t = by_band[band]
  if not t then t = {}; by_band[band] = t end
  t[#t + 1] = id
end

local function enqueue(band, vt, raw)
  if vt == '' then
    redis.call('XADD', KEYS[band + 1], '*', 'p', raw)
  else
    redis.call('XADD', KEYS[band + 1], '*', 'p', raw, 'v', vt)
  end
end
""".replace("__RELEASED__", RELEASED)

#: Create the consumer group on every band stream (MKSTREAM), ignoring BUSYGROUP.
ENSURE = (
    _PRELUDE
    + """
for band = 0, 9 do
  local r = redis.pcall('XGROUP', 'CREATE', KEYS[band + 1], G, '0', 'MKSTREAM')
  if type(r) == 'table' and r.err and not string.find(r.err, 'BUSYGROUP', 1, true) then
    return redis.error_reply(r.err)
  end
end
return 1
"""
)

#: ARGV: group, "<band>:<visibility ms or empty>:<due ms or empty>,...", then the
#: envelope bytes in the same order. Empty due: XADD to the band stream; else ZADD
#: to the delayed set. Returns how many were stored.
PUBLISH = (
    _PRELUDE
    + """
local i = 0
for band, vt, due in string.gmatch(ARGV[2], '(%d):(%d*):(%d*)') do
  i = i + 1
  local raw = ARGV[i + 2]
  if due == '' then
    enqueue(tonumber(band), vt, raw)
  else
    redis.call('ZADD', KEYS[11], due, band .. ':' .. vt .. ':' .. raw)
  end
end
return i
"""
)

#: PUBLISH for envelopes whose status is new. ARGV: group, the status key prefix,
#: "<band>:<vt>:<due>:<ttl ms>:<task id>,..." (``%`` and ``,`` in an id as ``%25``,
#: ``%2C``) then per envelope its bytes and its
#: status bytes. An envelope is stored only if ``SET <prefix><task id> <status> NX PX
#: <ttl>`` succeeds. Returns the 1-based positions stored. The status keys are built
#: here rather than passed in KEYS (packing two arguments per envelope instead of
#: three is most of a batch's client cost), so this script is not for Redis Cluster,
#: where the status keys live in other slots anyway.
PUBLISH_NEW = (
    _PRELUDE
    + """
local prefix = ARGV[2]
local done = {}
local i = 0
for band, vt, due, ttl, id in string.gmatch(ARGV[3], '(%d):(%d*):(%d*):(%d+):([^,]*)') do
  i = i + 1
  local raw = ARGV[2 + 2 * i]
  if string.find(id, '%', 1, true) then  -- ids with ',' or '%' come percent-encoded
    id = string.gsub(string.gsub(id, '%%2C', ','), '%%25', '%%')
  end
  if redis.call('SET', prefix .. id, ARGV[3 + 2 * i], 'NX', 'PX', ttl) then
    if due == '' then
      enqueue(tonumber(band), vt, raw)
    else
      redis.call('ZADD', KEYS[11], due, band .. ':' .. vt .. ':' .. raw)
    end
    done[#done + 1] = i
  end
end
return done
"""
)

#: PUBLISH_NEW for one envelope, lean (the common one-by-one enqueue: few arguments to
#: pack). KEYS: the status key, then the band stream (ready) or the delayed set, then
#: (a unique task) its lock key. ARGV: status, TTL ms, envelope, visibility ms or '',
#: due ms or '', band, then (unique) the task id (the lock's owner) and the lock TTL ms.
#: Returns 1 when stored, 0 when the status existed, -1 when another task holds the lock.
PUBLISH_NEW_ONE = """
if KEYS[3] then
  if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
  if not redis.call('SET', KEYS[3], ARGV[7], 'NX', 'PX', ARGV[8]) then
    if redis.call('GET', KEYS[3]) ~= ARGV[7] then return -1 end
    redis.call('PEXPIRE', KEYS[3], ARGV[8])
  end
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
elseif not redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return 0
end
if ARGV[5] ~= '' then
  redis.call('ZADD', KEYS[2], ARGV[5], ARGV[6] .. ':' .. ARGV[4] .. ':' .. ARGV[3])
elseif ARGV[4] == '' then
  redis.call('XADD', KEYS[2], '*', 'p', ARGV[3])
else
  redis.call('XADD', KEYS[2], '*', 'p', ARGV[3], 'v', ARGV[4])
end
return 1
"""

#: Lease up to ARGV[3] entries for consumer ARGV[2].
#: ARGV: group, consumer, want, now_ms, claim (0/1), horizon_ms, mover_batch.
#: Returns {next_due_ms or false, band, id, raw, delivery_count, band, id, ...}.
#: Order: (1) due delayed entries are moved into their streams; (2) when claim=1,
#: long leases are kept alive or, expired, claimed, then XAUTOCLAIM takes entries
#: idle past the horizon; (3) per band, highest first: nacked entries, then new
#: entries (XREADGROUP). Entries with their own visibility get their lease set here.
FETCH = (
    _PRELUDE
    + """
local consumer = ARGV[2]
local want = tonumber(ARGV[3])
local now = ARGV[4]
local claim = ARGV[5] == '1'
local H = tonumber(ARGV[6])
local out = {false}
local got = 0

local function lease(band, id, f)
  if f[3] == 'v' then
    local vt = tonumber(f[4])
    if vt and vt == vt then  -- NaN (vt ~= vt) or not a number: the default lease
      vt = math.floor(math.min(math.max(vt, __MIN_VT_MS__), __MAX_VT_MS__))
    else
      vt = nil
    end
    if vt and vt < H then
      redis.call('XCLAIM', KEYS[band + 1], G, consumer, 0, id, 'IDLE', H - vt, 'JUSTID')
    elseif vt and vt > H then
      redis.call('ZADD', KEYS[12], tonumber(now) + vt, band .. '|' .. id)
    end
  end
end

local function push(band, e, count)
  local f = e[2]
  local raw = ''
  if f and f[1] == 'p' then raw = f[2] end
  out[#out + 1] = band
  out[#out + 1] = e[1]
  out[#out + 1] = raw
  out[#out + 1] = count
  got = got + 1
  if f then lease(band, e[1], f) end
end

-- claim one entry `p` (its XPENDING row) for this consumer
local function take(band, p)
  local c = redis.call('XCLAIM', KEYS[band + 1], G, consumer, 0, p[1])
  if c[1] then push(band, c[1], p[4] + 1) end
end

-- (1) delayed -> streams
local due = redis.call('ZRANGEBYSCORE', KEYS[11], '-inf', now, 'LIMIT', 0, ARGV[7])
if #due > 0 then
  for i = 1, #due do
    local m = due[i]
    local band = string.byte(m, 1) - 48
    local sep = string.find(m, ':', 3, true)
    if band >= 0 and band <= 9 and sep and string.sub(m, 2, 2) == ':' then
      enqueue(band, string.sub(m, 3, sep - 1), string.sub(m, sep + 1))
    else
      -- not written by Stem: deliver the bytes so the worker dead-letters them
      enqueue(0, '', m)
    end
  end
  each_chunk(due, function(...) redis.call('ZREM', KEYS[11], ...) end)
end

-- (2) reclaim expired leases
if claim and want > 0 then
  local longs = redis.call('ZRANGE', KEYS[12], 0, -1, 'WITHSCORES')
  for i = 1, #longs, 2 do
    local band, id = split(longs[i])
    local p = pending(band, id)
    if not p then
      redis.call('ZREM', KEYS[12], longs[i])
    elseif tonumber(longs[i + 1]) > tonumber(now) then
      -- still leased: keep it out of XAUTOCLAIM's reach (owner and count unchanged)
      redis.call('XCLAIM', KEYS[band + 1], G, p[2], 0, id, 'IDLE', 0, 'JUSTID')
    elseif got < want then
      redis.call('ZREM', KEYS[12], longs[i])
      take(band, p)
    end
  end
  for band = 9, 0, -1 do
    if got >= want then break end
    local cursor = redis.call('HGET', KEYS[15], band) or '0-0'
    local r = redis.call('XAUTOCLAIM', KEYS[band + 1], G, consumer, H, cursor, 'COUNT', want - got)
    if r[1] ~= cursor then redis.call('HSET', KEYS[15], band, r[1]) end
    for _, e in ipairs(r[2]) do
      if e then  -- Redis 6.2 returns nil for entries deleted from the stream
        local p = pending(band, e[1])
        redis.call('ZREM', KEYS[13], band .. '|' .. e[1])
        push(band, e, p and p[4] or 1)
      end
    end
  end
end

-- (3) nacked, then new entries, highest band first
local released = redis.call('EXISTS', KEYS[13]) == 1
for band = 9, 0, -1 do
  if got >= want then break end
  if released then
    local ms = redis.call('ZRANGEBYSCORE', KEYS[13], band, band, 'LIMIT', 0, want - got)
    for _, m in ipairs(ms) do
      redis.call('ZREM', KEYS[13], m)
      local _, id = split(m)
      local p = pending(band, id)
      if p and p[2] == RELEASED then take(band, p) end
    end
  end
  if got < want then
    local r = redis.call('XREADGROUP', 'GROUP', G, consumer, 'COUNT', want - got,
                        'STREAMS', KEYS[band + 1], '>')
    if r then
      for _, e in ipairs(r[1][2]) do push(band, e, 1) end
    end
  end
end

local nd = redis.call('ZRANGE', KEYS[11], 0, 0, 'WITHSCORES')
if nd[2] then out[1] = nd[2] end
return out
""".replace("__MIN_VT_MS__", str(round(MIN_VISIBILITY_TIMEOUT * 1000)))
    .replace("__MAX_VT_MS__", str(round(MAX_VISIBILITY_TIMEOUT * 1000)))
)

#: ARGV: group, then (consumer, items) pairs. Returns flags.
ACK = (
    _PRELUDE
    + """
local by_band = {}
local flags = each_held(2, function(band, id) add_to(by_band, band, id) end)
finish(by_band)
return flags
"""
)

#: ARGV: group, then (consumer, items) pairs. Returns flags.
#: The entry stays where it is (its id, hence its place in line) and is handed to
#: the RELEASED pseudo-consumer, so the old holder's receipt stops working; the next
#: fetch takes it from ``released`` before newer entries of its band.
NACK = (
    _PRELUDE
    + """
local longs = redis.call('EXISTS', KEYS[12]) == 1
return each_held(2, function(band, id)
  redis.call('XCLAIM', KEYS[band + 1], G, RELEASED, 0, id, 'JUSTID')
  redis.call('ZADD', KEYS[13], band, band .. '|' .. id)
  if longs then redis.call('ZREM', KEYS[12], band .. '|' .. id) end
end)
"""
)

#: ARGV: group, then per delivery: item, consumer, new band, due ms ('' = now),
#: visibility ms (''), envelope bytes. Acks each held delivery and adds its
#: replacement in the same step; a lost lease gets no replacement. Returns flags.
RETRY = (
    _PRELUDE
    + """
local by_band = {}
local flags = each_held_item(2, 6, function(i, band, id)
  add_to(by_band, band, id)
  local nband, due, vt, raw = tonumber(ARGV[i + 2]), ARGV[i + 3], ARGV[i + 4], ARGV[i + 5]
  if due == '' then
    enqueue(nband, vt, raw)
  else
    redis.call('ZADD', KEYS[11], due, nband .. ':' .. vt .. ':' .. raw)
  end
end)
finish(by_band)
return flags
"""
)

#: ARGV: group, now_ms, cap, then per delivery: item, consumer, reason.
#: Copies the stored bytes to the dead-letter stream (trimmed to about ``cap``
#: entries, oldest first), then acks. Returns {flags, how many old dead letters the
#: cap dropped}; the drops are also added to the ``dead_trimmed`` counter.
DEAD = (
    _PRELUDE
    + """
local by_band = {}
local before = redis.call('XLEN', KEYS[14])
local added = 0
local flags = each_held_item(4, 3, function(i, band, id)
  local e = redis.call('XRANGE', KEYS[band + 1], id, id)[1]
  local raw = ''
  if e and e[2][1] == 'p' then raw = e[2][2] end
  redis.call('XADD', KEYS[14], 'MAXLEN', '~', ARGV[3], '*',
             'p', raw, 'r', ARGV[i + 2], 't', ARGV[2])
  added = added + 1
  add_to(by_band, band, id)
end)
finish(by_band)
local trimmed = 0
if added > 0 then
  trimmed = before + added - redis.call('XLEN', KEYS[14])
  if trimmed > 0 then redis.call('INCRBY', KEYS[16], trimmed) end
end
return {flags, trimmed}
"""
)

#: ARGV: group, now_ms, horizon_ms, lease_ms, then (consumer, items) pairs.
#: Sets each held lease to now + lease_ms. Returns flags.
EXTEND = (
    _PRELUDE
    + """
local now, H, L = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local longs = redis.call('EXISTS', KEYS[12]) == 1
return each_held(5, function(band, id, consumer)
  local member = band .. '|' .. id
  if L <= H then
    redis.call('XCLAIM', KEYS[band + 1], G, consumer, 0, id, 'IDLE', H - L, 'JUSTID')
    if longs then redis.call('ZREM', KEYS[12], member) end
  else
    redis.call('XCLAIM', KEYS[band + 1], G, consumer, 0, id, 'IDLE', 0, 'JUSTID')
    redis.call('ZADD', KEYS[12], now + L, member)
  end
end)
"""
)

#: ARGV: group. Returns {ready, in_flight, delayed, dead}.
STATS = (
    _PRELUDE
    + """
local ready, inflight = 0, 0
for band = 0, 9 do
  local s = KEYS[band + 1]
  local len = redis.call('XLEN', s)
  local total, released = 0, 0
  if redis.call('EXISTS', s) == 1 then
    local p = redis.pcall('XPENDING', s, G)
    if type(p) == 'table' and not p.err then
      total = tonumber(p[1])
      if p[4] then
        for _, c in ipairs(p[4]) do
          if c[1] == RELEASED then released = tonumber(c[2]) end
        end
      end
    end
  end
  inflight = inflight + total - released
  ready = ready + math.max(0, len - total) + released
end
return {ready, inflight, redis.call('ZCARD', KEYS[11]), redis.call('XLEN', KEYS[14])}
"""
)

#: ARGV: group, budget. Drops ready (incl. nacked) and delayed entries, leaving
#: leased ones alone. Returns {removed, more (1 when the budget ran out)}.
PURGE = (
    _PRELUDE
    + """
local budget = tonumber(ARGV[2])
local removed = redis.call('ZCARD', KEYS[11])
redis.call('DEL', KEYS[11])
local by_band = {}
for _, m in ipairs(redis.call('ZRANGE', KEYS[13], 0, -1)) do
  local band, id = split(m)
  local p = pending(band, id)
  if p and p[2] == RELEASED then
    add_to(by_band, band, id)
    removed = removed + 1
  end
end
redis.call('DEL', KEYS[13])
finish(by_band)
for band = 0, 9 do
  local s = KEYS[band + 1]
  if redis.call('EXISTS', s) == 1 then
    local last = nil
    local groups = redis.pcall('XINFO', 'GROUPS', s)
    if type(groups) == 'table' and not groups.err then
      for _, g in ipairs(groups) do
        local info = {}
        for j = 1, #g, 2 do info[g[j]] = g[j + 1] end
        if info['name'] == G then last = info['last-delivered-id'] end
      end
    end
    if not last then
      -- nobody has read this stream yet: every entry is ready
      removed = removed + redis.call('XLEN', s)
      redis.call('XTRIM', s, 'MAXLEN', 0)
    else
      while true do
        local r = redis.call('XRANGE', s, '(' .. last, '+', 'COUNT', 500)
        if #r == 0 then break end
        local ids = {}
        for j = 1, #r do ids[j] = r[j][1] end
        each_chunk(ids, function(...) redis.call('XDEL', s, ...) end)
        removed = removed + #r
        budget = budget - #r
        last = ids[#ids]
        if budget <= 0 then return {removed, 1} end
      end
    end
  end
end
return {removed, 0}
"""
)

#: ARGV: group, then task ids. Drops the waiting envelopes (ready, released or delayed)
#: of the queue whose id is one of them; leased ones stay. Returns how many. Reads every
#: waiting entry of the queue (an operator's command, not a hot path).
DELETE = (
    _PRELUDE
    + """
local want = {}
for i = 2, #ARGV do want[ARGV[i]] = true end
local function matches(raw)
  if not raw then return false end
  local ok, d = pcall(cjson.decode, raw)
  return ok and type(d) == 'table' and type(d['id']) == 'string' and want[d['id']] == true
end
local function payload(fields)
  for j = 1, #fields, 2 do
    if fields[j] == 'p' then return fields[j + 1] end
  end
  return nil
end
local removed = 0
for _, m in ipairs(redis.call('ZRANGE', KEYS[11], 0, -1)) do
  local c1 = string.find(m, ':', 1, true)
  local c2 = c1 and string.find(m, ':', c1 + 1, true)
  if c2 and matches(string.sub(m, c2 + 1)) then
    redis.call('ZREM', KEYS[11], m)
    removed = removed + 1
  end
end
local by_band = {}
for _, m in ipairs(redis.call('ZRANGE', KEYS[13], 0, -1)) do
  local band, id = split(m)
  local p = pending(band, id)
  if p and p[2] == RELEASED then
    local e = redis.call('XRANGE', KEYS[band + 1], id, id)[1]
    if e and matches(payload(e[2])) then
      add_to(by_band, band, id)
      redis.call('ZREM', KEYS[13], m)
      removed = removed + 1
    end
  end
end
finish(by_band)
for band = 0, 9 do
  local s = KEYS[band + 1]
  if redis.call('EXISTS', s) == 1 then
    local start = '-'
    local groups = redis.pcall('XINFO', 'GROUPS', s)
    if type(groups) == 'table' and not groups.err then
      for _, g in ipairs(groups) do
        local info = {}
        for j = 1, #g, 2 do info[g[j]] = g[j + 1] end
        if info['name'] == G then start = '(' .. info['last-delivered-id'] end
      end
    end
    while true do
      local r = redis.call('XRANGE', s, start, '+', 'COUNT', 500)
      if #r == 0 then break end
      for j = 1, #r do
        if matches(payload(r[j][2])) then
          redis.call('XDEL', s, r[j][1])
          removed = removed + 1
        end
      end
      start = '(' .. r[#r][1]
    end
  end
end
return removed
"""
)

#: ARGV: group, then per dead letter: dead entry id, band, visibility ms, due ms (empty:
#: now), bytes. Moves each dead letter that still exists back to its band stream, or to
#: the delayed set when it has a due time (a concurrent replay or purge cannot make it
#: run twice). Returns how many moved.
REPLAY = (
    _PRELUDE
    + """
local n = 0
for i = 2, #ARGV, 5 do
  if redis.call('XDEL', KEYS[14], ARGV[i]) == 1 then
    local band, vt, due, raw = ARGV[i + 1], ARGV[i + 2], ARGV[i + 3], ARGV[i + 4]
    if due == '' then
      enqueue(tonumber(band), vt, raw)
    else
      redis.call('ZADD', KEYS[11], due, band .. ':' .. vt .. ':' .. raw)
    end
    n = n + 1
  end
end
return n
"""
)

#: ARGV: group, idle_ms, consumer names. On every band, deletes the named consumers
#: and any consumer idle longer than idle_ms -- only those with nothing pending
#: (DELCONSUMER would drop their pending entries). Returns how many were deleted.
FORGET = (
    _PRELUDE
    + """
local names = {}
for i = 3, #ARGV do names[ARGV[i]] = true end
local idle_limit = tonumber(ARGV[2])
local n = 0
for band = 0, 9 do
  local s = KEYS[band + 1]
  local consumers = redis.pcall('XINFO', 'CONSUMERS', s, G)
  if type(consumers) == 'table' and not consumers.err then
    for _, c in ipairs(consumers) do
      local info = {}
      for j = 1, #c, 2 do info[c[j]] = c[j + 1] end
      if info['pending'] == 0 and (names[info['name']] or info['idle'] > idle_limit) then
        redis.call('XGROUP', 'DELCONSUMER', s, G, info['name'])
        n = n + 1
      end
    end
  end
end
return n
"""
)

#: Result backend, outside Redis Cluster only (its keys span slots). ARGV[1] is
#: "<ttl ms>:<terminal 0/1>,..." for KEYS in order, ARGV[2..] the status JSONs:
#: SET each with PX and PUBLISH terminal ones on the key's channel. One command per
#: batch instead of two per status, and few arguments for the client to encode.
SET_STATUSES = """
local i = 0
for ms, terminal in string.gmatch(ARGV[1], '(%d+):(%d)') do
  i = i + 1
  local raw = ARGV[i + 1]
  redis.call('SET', KEYS[i], raw, 'PX', ms)
  if terminal == '1' then redis.call('PUBLISH', KEYS[i], raw) end
end
return i
"""

#: SET NX each status (KEYS[i] to ARGV[i + 1] with TTL ms from ARGV[1]
#: "ms:terminal,..."), PUBLISH the terminal ones written; returns the positions written.
ADD_STATUSES = """
local i = 0
local done = {}
for ms, terminal in string.gmatch(ARGV[1], '(%d+):(%d)') do
  i = i + 1
  local raw = ARGV[i + 1]
  if redis.call('SET', KEYS[i], raw, 'NX', 'PX', ms) then
    if terminal == '1' then redis.call('PUBLISH', KEYS[i], raw) end
    done[#done + 1] = i
  end
end
return done
"""

#: Compare-and-set of one status (KEYS[1]) for ``append_meta``: ARGV[1] the SHA-1 of
#: the value the client read, ARGV[2] the value to write. Writes only if the value is
#: still the one read, keeping its TTL (PTTL, not KEEPTTL: Redis before 6 has none);
#: 1 written, 0 changed meanwhile (read again), -1 gone. The JSON is changed by the
#: client, not by cjson here: cjson would turn an empty object into an array and round
#: numbers to 14 digits.
STATUS_CAS = """
local cur = redis.call('GET', KEYS[1])
if not cur then return -1 end
if redis.sha1hex(cur) ~= ARGV[1] then return 0 end
local ttl = redis.call('PTTL', KEYS[1])
if ttl > 0 then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ttl)
else
  redis.call('SET', KEYS[1], ARGV[2])
end
return 1
"""

#: The broker's scripts by name.
ALL = {
    "ensure": ENSURE,
    "publish": PUBLISH,
    "publish_new": PUBLISH_NEW,
    "publish_new_one": PUBLISH_NEW_ONE,
    "fetch": FETCH,
    "ack": ACK,
    "nack": NACK,
    "retry": RETRY,
    "dead": DEAD,
    "extend": EXTEND,
    "stats": STATS,
    "purge": PURGE,
    "delete": DELETE,
    "replay": REPLAY,
    "forget": FORGET,
}

# -- lock store (stem.adapters.redis.locks): one key, KEYS[1] = <ns>:lock:<key> --------

#: ARGV owner, ttl ms. Take a free key (SET NX PX) or extend the owner's own; 1/0.
LOCK_ACQUIRE = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"""

#: ARGV owner, ttl ms. Extend only the owner's unexpired lock; 1/0.
LOCK_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"""

#: ARGV owner. Delete only the owner's lock; 1/0.
LOCK_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
"""

# -- schedule store (stem.adapters.redis.schedules) ---------------------------------
# KEYS[1] the entry's hash, KEYS[2] the index ZSET, KEYS[3] the entry's history stream
# (one hash tag for all of them on Redis Cluster). A hash field holding '' is null, as
# the Dart store writes it.

#: ARGV: 1 expected version ('' none), 2 id, 3 index score ('+inf': not due), 4 createdAt
#: for a new entry, 5 updatedAt, 6.. field, value pairs (everything but version and the
#: two times). Returns {1, version, createdAt} or {0, actual version or -1 when absent}.
SCHEDULE_UPSERT = """
local exists = redis.call('EXISTS', KEYS[1]) == 1
local v = 0
if exists then v = tonumber(redis.call('HGET', KEYS[1], 'version')) or 0 end
if ARGV[1] ~= '' then
  local expected = tonumber(ARGV[1])
  if expected == 0 then
    if exists then return {0, v} end
  elseif not exists then return {0, -1}
  elseif v ~= expected then return {0, v} end
end
local created = ARGV[4]
if exists then
  local stored = redis.call('HGET', KEYS[1], 'createdAt')
  if stored and stored ~= '' then created = stored end
  redis.call('DEL', KEYS[1])
end
v = v + 1
redis.call('HSET', KEYS[1], 'version', v, 'createdAt', created, 'updatedAt', ARGV[5],
           unpack(ARGV, 6))
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[2])
return {1, v, created}
"""

# mark(hash, index, history, a, o): record one run whose arguments are a[o+1]..a[o+14]
# in the order of SCHEDULE_MARK_RUN's ARGV. Returns the entry's fields (HGETALL), or
# false when the version moved on or the entry is gone (then nothing is written).
_SCHEDULE_MARK = """
local function mark(kh, ki, kx, a, o)
  if redis.call('EXISTS', kh) == 0 then return false end
  local v = tonumber(redis.call('HGET', kh, 'version')) or 0
  if v ~= tonumber(a[o + 1]) then return false end
  local count = tonumber(redis.call('HGET', kh, 'totalRunCount')) or 0
  local enabled = redis.call('HGET', kh, 'enabled') ~= 'false'
  local nxt = a[o + 4]
  if a[o + 6] == '1' then
    enabled = false
    nxt = ''
    redis.call('HSET', kh, 'enabled', 'false')
  end
  redis.call('HSET', kh, 'lastRunAt', a[o + 3], 'nextRunAt', nxt, 'driftMs', a[o + 9],
             'lastJitterMs', a[o + 10], 'updatedAt', a[o + 11], 'totalRunCount', count + 1,
             'version', v + 1)
  if a[o + 7] == '1' then
    redis.call('HSET', kh, 'lastSuccessAt', a[o + 3], 'lastError', '')
  else
    redis.call('HSET', kh, 'lastErrorAt', a[o + 3], 'lastError', a[o + 8])
  end
  if enabled and nxt ~= '' then
    redis.call('ZADD', ki, a[o + 5], a[o + 2])
  else
    redis.call('ZADD', ki, '+inf', a[o + 2])
  end
  redis.call('XADD', kx, 'MAXLEN', a[o + 14], '*', 'scheduledAt', a[o + 12],
             'executedAt', a[o + 3], 'success', a[o + 7] == '1' and 'true' or 'false',
             'durationMs', a[o + 13], 'error', a[o + 8])
  return redis.call('HGETALL', kh)
end
"""

#: ARGV: 1 expected version, 2 id, 3 executedAt, 4 next run ISO ('' none), 5 its index
#: score, 6 disable 0/1, 7 success 0/1, 8 error ('' none), 9 driftMs, 10 lastJitterMs,
#: 11 updatedAt, 12 scheduledAt, 13 durationMs, 14 history bound. Returns the entry's
#: fields (HGETALL) or nil when the version moved on or the entry is gone.
SCHEDULE_MARK_RUN = _SCHEDULE_MARK + """
local out = mark(KEYS[1], KEYS[2], KEYS[3], ARGV, 0)
if not out then return nil end
return out
"""

#: A batch of runs of distinct entries: KEYS are (hash, index, history) per run, ARGV 14
#: per run in SCHEDULE_MARK_RUN's order. Returns one reply per run, in order: the
#: entry's fields, or 0 when its version moved on or it is gone (that run only).
SCHEDULE_MARK_RUNS = _SCHEDULE_MARK + """
local out = {}
for i = 0, #KEYS / 3 - 1 do
  local fields = mark(KEYS[3 * i + 1], KEYS[3 * i + 2], KEYS[3 * i + 3], ARGV, 14 * i)
  if fields then out[i + 1] = fields else out[i + 1] = 0 end
end
return out
"""

#: ARGV: 1 id. Delete the entry, its history and its index member; 1/0 (existed).
SCHEDULE_REMOVE = """
local existed = redis.call('DEL', KEYS[1])
redis.call('DEL', KEYS[3])
redis.call('ZREM', KEYS[2], ARGV[1])
return existed
"""
