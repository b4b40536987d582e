-- The GCRA of gcra.rs (gcra_reserve, gcra_refund) over all of a request's quotas as one
-- atomic step in Redis: reserve all or none, or refund all.
-- KEYS[i]: bucket i, holding its theoretical arrival time (TAT) in microseconds.
-- ARGV[1]: "reserve" or "refund"; then per_second, burst, cost for each key, in order.
-- Reserve returns {all allowed (1 or 0)} followed, for each key, by {allowed (1 or 0),
-- remaining, reset_us, retry_after_us (-1: never fits)}; when not all are allowed nothing is
-- stored, and an allowed key reports what is left without this request. Refund returns 0.
-- Time is the server's (TIME), so that every replica agrees; counted from 2023-11-14 rather than
-- 1970 so that a double keeps sub-microsecond precision (1/64 us in 2026, 1/8 us until 2041)
-- where microseconds since 1970 would round to a quarter.
local t = redis.call('TIME')
local now = (tonumber(t[1]) - 1700000000) * 1000000 + tonumber(t[2])
local slack = 0.001

-- A key lives until its quota is full again: idle tenants vanish.
local function store(key, tat)
  redis.call('SET', key, string.format('%.17g', tat), 'PX', math.max(1, math.ceil((tat - now) / 1000)))
end
local function micros(x)
  if x <= slack then return 0 end
  return math.ceil(x - slack)
end
local function quota(i)
  local per_second = tonumber(ARGV[3 * i - 1])
  return 1000000 / per_second, tonumber(ARGV[3 * i]), tonumber(ARGV[3 * i + 1])
end
local function stored(i)
  local value = redis.call('GET', KEYS[i])
  if value then return tonumber(value) end
  return nil
end

if ARGV[1] == 'refund' then
  for i = 1, #KEYS do
    local unit, burst, cost = quota(i)
    local tat = stored(i)
    if tat then
      local refunded = tat - math.min(cost, burst) * unit
      if refunded > now + slack then store(KEYS[i], refunded) else redis.call('DEL', KEYS[i]) end
    end
  end
  return 0
end

local out = {1}
local new_tats = {}
local without = {}
for i = 1, #KEYS do
  local unit, burst, cost = quota(i)
  local tolerance = burst * unit
  local function remaining(ahead)
    local free = math.floor((tolerance - ahead) / unit + 0.000001)
    if free < 0 then return 0 end
    if free > burst then return burst end
    return free
  end
  local tat = now
  local old = stored(i)
  if old and old > now then tat = old end
  local new_tat = tat + cost * unit
  local over = new_tat - now - tolerance
  local base = 4 * i - 2
  if over > slack then
    out[1] = 0
    local retry = -1
    if cost <= burst then retry = micros(over) end
    out[base], out[base + 1], out[base + 2], out[base + 3] = 0, remaining(tat - now), micros(tat - now), retry
  else
    new_tats[i] = new_tat
    without[i] = {remaining(tat - now), micros(tat - now)}
    out[base], out[base + 1], out[base + 2], out[base + 3] = 1, remaining(new_tat - now), micros(new_tat - now), -1
  end
end
for i, new_tat in pairs(new_tats) do
  if out[1] == 1 then
    store(KEYS[i], new_tat)
  else
    out[4 * i - 1], out[4 * i] = without[i][1], without[i][2]
  end
end
return out
