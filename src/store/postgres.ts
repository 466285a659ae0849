// The shared store: the outbox and the dedup window in PostgreSQL, so that several relay
// instances behind one load balancer share them. Each due delivery is claimed by exactly one
// instance with `FOR UPDATE SKIP LOCKED` and a lease (claimed_until): an instance that dies
// holding a claim only delays those deliveries until the lease ends.
// Tables are prefixed `push_relay_` so they can live in a database Mattermost admins already run.
import pg from 'pg';
import { groupCommit, toDeadLetter, toPending, type DeadRow, type Row } from './shared.js';
import type { KeyValue, NewDelivery, Store, StoreStats } from './types.js';

const SCHEMA = `
CREATE TABLE IF NOT EXISTS push_relay_outbox (
  id BIGSERIAL PRIMARY KEY,
  sink TEXT NOT NULL,
  ack_id TEXT NOT NULL,
  payload TEXT NOT NULL,
  created_at BIGINT NOT NULL,
  expires_at BIGINT NOT NULL,
  next_attempt_at BIGINT NOT NULL,
  attempts INTEGER NOT NULL DEFAULT 0,
  last_error TEXT NOT NULL DEFAULT '',
  claimed_until BIGINT NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS push_relay_outbox_due ON push_relay_outbox (next_attempt_at, id);
CREATE INDEX IF NOT EXISTS push_relay_outbox_expiry ON push_relay_outbox (expires_at);
CREATE TABLE IF NOT EXISTS push_relay_dead_letters (
  id BIGSERIAL PRIMARY KEY,
  sink TEXT NOT NULL,
  ack_id TEXT NOT NULL,
  payload TEXT NOT NULL,
  created_at BIGINT NOT NULL,
  expires_at BIGINT NOT NULL,
  attempts INTEGER NOT NULL,
  last_error TEXT NOT NULL,
  failed_at BIGINT NOT NULL,
  reason TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS push_relay_dedup (
  ack_id TEXT NOT NULL,
  sink TEXT NOT NULL,
  expires_at BIGINT NOT NULL,
  PRIMARY KEY (ack_id, sink)
);
CREATE TABLE IF NOT EXISTS push_relay_kv (
  ns TEXT NOT NULL,
  key TEXT NOT NULL,
  value TEXT NOT NULL,
  PRIMARY KEY (ns, key)
);
`;

export async function openPostgresStore(url: string): Promise<Store> {
  const pool = new pg.Pool({ connectionString: url, max: 10, connectionTimeoutMillis: 5000 });
  pool.on('error', () => {
    /* an idle client lost its connection; the pool replaces it on next use */
  });
  // Several instances may start at once: serialise the schema creation.
  const client = await pool.connect();
  try {
    await client.query('SELECT pg_advisory_lock(727274)');
    await client.query(SCHEMA);
  } finally {
    await client.query('SELECT pg_advisory_unlock(727274)').catch(() => {});
    client.release();
  }

  // Group commit: one multi-row INSERT per event-loop turn.
  const commits = groupCommit(async (rows: NewDelivery[]) => {
    const ids: number[] = [];
    for (let off = 0; off < rows.length; off += 1000) {
      const chunk = rows.slice(off, off + 1000);
      const values: unknown[] = [];
      const tuples = chunk.map((r, i) => {
        values.push(r.sink, r.ackId, r.payload, r.createdAt, r.expiresAt, r.nextAttemptAt, r.attempts, r.lastError);
        const p = i * 8;
        return `($${p + 1},$${p + 2},$${p + 3},$${p + 4},$${p + 5},$${p + 6},$${p + 7},$${p + 8})`;
      });
      const res = await pool.query<{ id: string }>(
        `INSERT INTO push_relay_outbox (sink, ack_id, payload, created_at, expires_at, next_attempt_at, attempts, last_error)
         VALUES ${tuples.join(',')} RETURNING id`,
        values,
      );
      ids.push(...res.rows.map((r) => Number(r.id)));
    }
    return ids;
  });

  const q = async <R extends pg.QueryResultRow>(sql: string, params: unknown[] = []) => (await pool.query<R>(sql, params)).rows;
  const n = async (sql: string, params: unknown[] = []) => (await pool.query(sql, params)).rowCount ?? 0;

  const DEAD_COLUMNS = 'sink, ack_id, payload, created_at, expires_at, attempts, last_error, failed_at, reason';

  return {
    kind: 'postgres',
    enqueue: commits.enqueue,
    async claim(sinks, limit, leaseMs, now) {
      if (sinks.length === 0) return [];
      const rows = await q<Row>(
        `UPDATE push_relay_outbox SET claimed_until = $1 WHERE id IN (
           SELECT id FROM push_relay_outbox
           WHERE next_attempt_at <= $2 AND claimed_until <= $2 AND sink = ANY($3)
           ORDER BY next_attempt_at, id LIMIT $4 FOR UPDATE SKIP LOCKED)
         RETURNING *`,
        [now + leaseMs, now, sinks, limit],
      );
      return rows.map(toPending).sort((a, b) => a.nextAttemptAt - b.nextAttemptAt || a.id - b.id);
    },
    async complete(ids) {
      if (ids.length) await n('DELETE FROM push_relay_outbox WHERE id = ANY($1)', [ids]);
    },
    async cancel(id, now) {
      return (await n('DELETE FROM push_relay_outbox WHERE id = $1 AND claimed_until <= $2', [id, now])) > 0;
    },
    async reschedule(id, attempts, nextAttemptAt, lastError) {
      await n('UPDATE push_relay_outbox SET attempts = $1, next_attempt_at = $2, last_error = $3, claimed_until = 0 WHERE id = $4', [
        attempts,
        nextAttemptAt,
        lastError,
        id,
      ]);
    },
    async bury(row, reason, now) {
      if (!('id' in row)) {
        await n(`INSERT INTO push_relay_dead_letters (${DEAD_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)`, [
          row.sink, row.ackId, row.payload, row.createdAt, row.expiresAt, row.attempts, row.lastError, now, reason,
        ]);
        return;
      }
      await n(
        `WITH moved AS (DELETE FROM push_relay_outbox WHERE id = $1 RETURNING *)
         INSERT INTO push_relay_dead_letters (${DEAD_COLUMNS})
         SELECT sink, ack_id, payload, created_at, expires_at, $2::int, $3, $4, $5 FROM moved`,
        [row.id, row.attempts, row.lastError, now, reason],
      );
    },
    async expire(now) {
      return n(
        `WITH moved AS (
           DELETE FROM push_relay_outbox WHERE id IN (
             SELECT id FROM push_relay_outbox WHERE expires_at <= $1 AND claimed_until <= $1 FOR UPDATE SKIP LOCKED)
           RETURNING *)
         INSERT INTO push_relay_dead_letters (${DEAD_COLUMNS})
         SELECT sink, ack_id, payload, created_at, expires_at, attempts, last_error, $1,
                'expired: time to live passed after ' || attempts || ' attempt(s)' ||
                CASE WHEN last_error <> '' THEN '; last error: ' || last_error ELSE '' END
         FROM moved`,
        [now],
      );
    },
    dedup: {
    async acquire(ackId, sink, windowMs, now) {
      const rows = await q(
        `INSERT INTO push_relay_dedup (ack_id, sink, expires_at) VALUES ($1, $2, $3)
         ON CONFLICT (ack_id, sink) DO UPDATE SET expires_at = EXCLUDED.expires_at
         WHERE push_relay_dedup.expires_at <= $4
         RETURNING 1`,
        [ackId, sink, now + windowMs, now],
      );
      if (Math.random() < 0.001) void n('DELETE FROM push_relay_dedup WHERE expires_at <= $1', [now]).catch(() => {});
      return rows.length === 1;
    },
    async release(ackId, sink) {
      await n('DELETE FROM push_relay_dedup WHERE ack_id = $1 AND sink = $2', [ackId, sink]);
    },
    },
    kv: (ns): KeyValue => ({
      async get(key) {
        return (await q<{ value: string }>('SELECT value FROM push_relay_kv WHERE ns = $1 AND key = $2', [ns, key]))[0]?.value;
      },
      async set(key, value) {
        await n(
          'INSERT INTO push_relay_kv (ns, key, value) VALUES ($1, $2, $3) ON CONFLICT (ns, key) DO UPDATE SET value = EXCLUDED.value',
          [ns, key, value],
        );
      },
      async delete(key) {
        return (await n('DELETE FROM push_relay_kv WHERE ns = $1 AND key = $2', [ns, key])) > 0;
      },
      async list(prefix = '') {
        const rows = await q<{ key: string; value: string }>(
          'SELECT key, value FROM push_relay_kv WHERE ns = $1 AND left(key, length($2)) = $2 ORDER BY key COLLATE "C"',
          [ns, prefix],
        );
        return rows.map((r) => [r.key, r.value]);
      },
      async swap(key, expected, next) {
        if (expected === undefined) {
          if (next === undefined) return (await q('SELECT 1 FROM push_relay_kv WHERE ns = $1 AND key = $2', [ns, key])).length === 0;
          return (await n('INSERT INTO push_relay_kv (ns, key, value) VALUES ($1, $2, $3) ON CONFLICT (ns, key) DO NOTHING', [ns, key, next])) > 0;
        }
        if (next === undefined) return (await n('DELETE FROM push_relay_kv WHERE ns = $1 AND key = $2 AND value = $3', [ns, key, expected])) > 0;
        return (await n('UPDATE push_relay_kv SET value = $4 WHERE ns = $1 AND key = $2 AND value = $3', [ns, key, expected, next])) > 0;
      },
    }),
    async stats(): Promise<StoreStats> {
      const [total] = await q<{ n: string; oldest: string | null }>('SELECT COUNT(*) AS n, MIN(created_at) AS oldest FROM push_relay_outbox');
      const [dead] = await q<{ n: string }>('SELECT COUNT(*) AS n FROM push_relay_dead_letters');
      const bySink = await q<{ sink: string; n: string }>('SELECT sink, COUNT(*) AS n FROM push_relay_outbox GROUP BY sink');
      return {
        depth: Number(total?.n ?? 0),
        oldestCreatedAt: total?.oldest == null ? null : Number(total.oldest),
        deadLetters: Number(dead?.n ?? 0),
        bySink: Object.fromEntries(bySink.map((r) => [r.sink, Number(r.n)])),
      };
    },
    async list(limit) {
      return (await q<Row>('SELECT * FROM push_relay_outbox ORDER BY id LIMIT $1', [limit])).map(toPending);
    },
    async retryNow(sink) {
      return sink
        ? n('UPDATE push_relay_outbox SET next_attempt_at = 0 WHERE sink = $1', [sink])
        : n('UPDATE push_relay_outbox SET next_attempt_at = 0');
    },
    async purge(sink) {
      return sink ? n('DELETE FROM push_relay_outbox WHERE sink = $1', [sink]) : n('DELETE FROM push_relay_outbox');
    },
    async deadLetters(limit) {
      return (await q<DeadRow>('SELECT * FROM push_relay_dead_letters ORDER BY failed_at DESC, id DESC LIMIT $1', [limit])).map(toDeadLetter);
    },
    async replay(ids, now, ttlMs) {
      const c = await pool.connect();
      try {
        await c.query('BEGIN');
        const rows = (
          ids === 'all'
            ? await c.query<DeadRow>('DELETE FROM push_relay_dead_letters RETURNING *')
            : await c.query<DeadRow>('DELETE FROM push_relay_dead_letters WHERE id = ANY($1) RETURNING *', [ids])
        ).rows;
        for (const r of rows) {
          await c.query(
            `INSERT INTO push_relay_outbox (sink, ack_id, payload, created_at, expires_at, next_attempt_at, attempts, last_error)
             VALUES ($1, $2, $3, $4, $5, 0, 0, $6)`,
            [r.sink, r.ack_id, r.payload, now, now + ttlMs(r.sink), `replayed after: ${r.reason}`],
          );
        }
        await c.query('COMMIT');
        return rows.length;
      } catch (err) {
        await c.query('ROLLBACK').catch(() => {});
        throw err;
      } finally {
        c.release();
      }
    },
    async close() {
      await commits.flush();
      await pool.end();
    },
  };
}
