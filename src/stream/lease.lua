-- redis-streamd: keys held across a consumer group (order_scope = "group").
-- One prelude shared by every step; the step is ARGV[A] (see below). Loaded by
-- src/stream/lease.rs, which documents the design.
--
-- KEYS[1] = the stream, KEYS[2] = this consumer's inbox. Leases and other consumers'
-- inboxes are not declared (their names come from entries read inside the script); they
-- share the stream's hash slot through the prefix, which Redis Cluster allows.
-- ARGV: 1 group, 2 consumer, 3 lease time (ms), 4 key lifetime backstop (ms),
-- 5 lease key prefix, 6 inbox key prefix, 7 key mode ('f' field | 'j' JSON pointer),
-- 8 the key field (f) or the payload field (j), 9 number N of pointer tokens,
-- 10..9+N the tokens (unescaped), then the step and its arguments.
local S, INBOX = KEYS[1], KEYS[2]
local G, ME = ARGV[1], ARGV[2]
local TTL, KEEP = tonumber(ARGV[3]), tonumber(ARGV[4])
local LP, IP = ARGV[5], ARGV[6]
local MODE, FIELD = ARGV[7], ARGV[8]
local NTOK = tonumber(ARGV[9])
local TOKENS = {}
for i = 1, NTOK do TOKENS[i] = ARGV[9 + i] end
local A = 10 + NTOK
local STEP = ARGV[A]
A = A + 1
local clock = redis.call('TIME')
local NOW = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)

local function field(fields, name)
  for i = 1, #fields, 2 do
    if fields[i] == name then return fields[i + 1] end
  end
  return nil
end

-- A JSON value as key text: a string is itself, a number its shortest exact decimal
-- form, anything else its JSON text.
local function text(v)
  local t = type(v)
  if t == 'string' then return v end
  if t == 'number' then
    if v == math.floor(v) and v > -2^53 and v < 2^53 then return string.format('%d', v) end
    for _, f in ipairs({'%.15g', '%.16g'}) do
      local s = string.format(f, v)
      if tonumber(s) == v then return s end
    end
    return string.format('%.17g', v)
  end
  if t == 'boolean' then return tostring(v) end
  if v == cjson.null then return 'null' end
  return cjson.encode(v)
end

-- The ordering key of an entry (its field/value list), or false when it has none.
local function keyof(fields)
  if not fields then return false end
  local raw = field(fields, FIELD)
  if MODE == 'f' or not raw then return raw or false end
  local ok, doc = pcall(cjson.decode, raw)
  if not ok then return false end
  for _, tok in ipairs(TOKENS) do
    if type(doc) ~= 'table' then return false end
    local v = doc[tok]
    if v == nil and string.match(tok, '^%d+$') and (tok == '0' or string.sub(tok, 1, 1) ~= '0') then
      v = doc[tonumber(tok) + 1]
    end
    if v == nil then return false end
    doc = v
  end
  return text(doc)
end

local function id_less(a, b)
  local am, as = string.match(a, '^(%d+)-(%d+)$')
  local bm, bs = string.match(b, '^(%d+)-(%d+)$')
  if not (am and bm) then return a < b end
  if #am ~= #bm then return #am < #bm end
  if am ~= bm then return am < bm end
  if #as ~= #bs then return #as < #bs end
  return as < bs
end

local function pending(id)
  return redis.call('XPENDING', S, G, id, id, 1)[1]
end

local function fields_of(id)
  local r = redis.call('XRANGE', S, id, id)
  if r[1] then return r[1][2] end
  return false
end

-- We hold `lease` (`renew`: it is ours already, and its lifetime is pushed out by the
-- renewals) and `id` is one of its entries.
local function hold(lease, id, renew)
  redis.call('HSET', lease, '@h', ME, '@t', NOW + TTL, id, '')
  if not renew then redis.call('PEXPIRE', lease, KEEP) end
end

-- Entries that became ours because we took their key over: {id, fields, key, deliveries}.
local taken = {}
local takeovers = 0

-- The lease of `key` was not renewed in time: its holder is presumed dead. Every entry
-- of the key still pending moves to us, so they run here, in id order, before any later
-- one. The first of them may have started: it counts a delivery (plain XCLAIM); the
-- others never ran and keep their counters (JUSTID).
local function take_over(lease, key, except, from)
  local ids = {except}
  for _, f in ipairs(redis.call('HKEYS', lease)) do
    if string.sub(f, 1, 1) ~= '@' and f ~= except then ids[#ids + 1] = f end
  end
  table.sort(ids, id_less)
  local first = true
  for _, id in ipairs(ids) do
    local p = id ~= except and pending(id)
    if p and p[2] ~= ME then
      if first then
        redis.call('XCLAIM', S, G, ME, 0, id)
      else
        redis.call('XCLAIM', S, G, ME, 0, id, 'JUSTID')
      end
      p = pending(id)
    end
    if id == except or p then
      first = false
    else
      redis.call('HDEL', lease, id)
    end
    if p then taken[#taken + 1] = {id, fields_of(id), key, p[4]} end
  end
  -- What the old holder's inbox says about this key is ours now: drop it there.
  local inbox = IP .. from
  for _, row in ipairs(redis.call('XRANGE', inbox, '-', '+')) do
    if field(row[2], 'key') == key then redis.call('XDEL', inbox, row[1]) end
  end
  if redis.call('XLEN', inbox) == 0 then redis.call('DEL', inbox) end
  takeovers = takeovers + 1
end

-- What happens to entry `id` of `key`, pending at us: 'free' (no key: it runs), 'mine'
-- (we hold the key), 'taken' (we took the key over from a consumer presumed dead), or
-- 'handed' (another consumer holds the key: the entry moves to it, counter kept, and its
-- inbox says so). The second value names the other consumer.
local function decide(id, key)
  if not key then return 'free' end
  local lease = LP .. key
  local h = redis.call('HMGET', lease, '@h', '@t')
  local holder, till = h[1], tonumber(h[2])
  if not holder or holder == ME then
    hold(lease, id, holder == ME)
    return 'mine'
  end
  if till and till > NOW then
    if #redis.call('XCLAIM', S, G, holder, 0, id, 'JUSTID') > 0 then
      redis.call('HSET', lease, id, '')
      local inbox = IP .. holder
      redis.call('XADD', inbox, '*', 'id', id, 'key', key)
      redis.call('PEXPIRE', inbox, KEEP)
    end
    return 'handed', holder
  end
  take_over(lease, key, id, holder)
  hold(lease, id, false)
  return 'taken', holder
end

-- Entries other consumers handed to us, at most `max`: {id, fields, key, deliveries}.
-- One that is no longer ours (its key was taken over from us meanwhile) is dropped.
local function pop_inbox(max)
  local got = {}
  if max <= 0 then return got end
  local rows = redis.call('XRANGE', INBOX, '-', '+', 'COUNT', max)
  for _, row in ipairs(rows) do
    redis.call('XDEL', INBOX, row[1])
    local id, key = field(row[2], 'id'), field(row[2], 'key')
    local p = id and pending(id)
    if p and p[2] == ME then got[#got + 1] = {id, fields_of(id), key or false, p[4]} end
  end
  if #rows > 0 and redis.call('XLEN', INBOX) == 0 then redis.call('DEL', INBOX) end
  return got
end

-- read COUNT ROOM: entries handed to us (up to ROOM), then new entries (XREADGROUP >,
-- up to COUNT), each decided at once: a delivery and its key's decision are one step,
-- so no consumer can decide about a later entry of a key before an earlier one.
-- Returns {read {id, fields, key, decision, other}..., inbox, taken, tail, takeovers}:
-- tail is the stream's last id when nothing came, to wait for more from there.
if STEP == 'read' then
  local count, room = tonumber(ARGV[A]), tonumber(ARGV[A + 1])
  local inbox = pop_inbox(room)
  local read = {}
  if count > 0 then
    local r = redis.call('XREADGROUP', 'GROUP', G, ME, 'COUNT', count, 'STREAMS', S, '>')
    if r then
      for _, e in ipairs(r[1][2]) do
        local key = keyof(e[2])
        local code, other = decide(e[1], key)
        read[#read + 1] = {e[1], e[2], key, code, other or false}
      end
    end
  end
  local tail = false
  if #read == 0 and #inbox == 0 then
    local last = redis.call('XREVRANGE', S, '+', '-', 'COUNT', 1)[1]
    tail = last and last[1] or '0-0'
  end
  return {read, inbox, taken, tail, takeovers}
end

-- admit ID...: entries already pending at us (our own at start, claimed, recovered),
-- decided as in `read`. Returns {{id, key, decision, other}..., taken, takeovers}.
if STEP == 'admit' then
  local out = {}
  for i = A, #ARGV do
    local id = ARGV[i]
    local key = keyof(fields_of(id))
    local code, other = decide(id, key)
    out[#out + 1] = {id, key, code, other or false}
  end
  return {out, taken, takeovers}
end

-- renew (KEY N ID...)...: for every key we hold, push its lease's end out by the lease
-- time and keep its entries ours and fresh (XCLAIM JUSTID resets their idle time); so
-- are entries handed to us and not taken yet. Returns the keys no longer ours.
if STEP == 'renew' then
  local lost = {}
  local i = A
  while i <= #ARGV do
    local key, n = ARGV[i], tonumber(ARGV[i + 1])
    local lease = LP .. key
    if redis.call('HGET', lease, '@h') == ME then
      redis.call('HSET', lease, '@t', NOW + TTL)
      redis.call('PEXPIRE', lease, KEEP)
      if n > 0 then
        redis.call('XCLAIM', S, G, ME, 0, unpack(ARGV, i + 2, i + 1 + n), 'JUSTID')
      end
    else
      lost[#lost + 1] = key
    end
    i = i + 2 + n
  end
  for _, row in ipairs(redis.call('XRANGE', INBOX, '-', '+')) do
    local id, key = field(row[2], 'id'), field(row[2], 'key')
    if id and key and redis.call('HGET', LP .. key, '@h') == ME then
      redis.call('XCLAIM', S, G, ME, 0, id, 'JUSTID')
    end
  end
  redis.call('PEXPIRE', INBOX, KEEP)
  return lost
end

-- done N ID... (ID KEY)...: XACK the N ids, then drop each (id, key) from its key's
-- lease if we still hold it; a lease with no entry left is deleted, so the key is free.
-- Returns what XACK returned.
if STEP == 'done' then
  local n = tonumber(ARGV[A])
  local acked = 0
  if n > 0 then acked = redis.call('XACK', S, G, unpack(ARGV, A + 1, A + n)) end
  local i = A + 1 + n
  while i < #ARGV do
    local lease = LP .. ARGV[i + 1]
    if redis.call('HGET', lease, '@h') == ME then
      redis.call('HDEL', lease, ARGV[i])
      if redis.call('HLEN', lease) <= 2 then redis.call('DEL', lease) end
    end
    i = i + 2
  end
  return acked
end

-- expire KEY...: we stop (shutdown, reload): leases of keys we hold end now, so the next
-- consumer to meet one of those keys takes its pending entries over at once.
if STEP == 'expire' then
  for i = A, #ARGV do
    local lease = LP .. ARGV[i]
    if redis.call('HGET', lease, '@h') == ME then redis.call('HSET', lease, '@t', 0) end
  end
  return 0
end

return redis.error_reply('redis-streamd lease script: unknown step ' .. tostring(STEP))
