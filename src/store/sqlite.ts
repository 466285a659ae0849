// The embedded store: one SQLite file (better-sqlite3, WAL) in the data directory.
//
// WAL with synchronous=NORMAL: a commit is in the OS before `enqueue` resolves, so a killed
// relay loses nothing it answered OK for; only a power cut can lose the last commits
// (https://www.sqlite.org/wal.html#durability). Writes from concurrent requests are grouped
// into one transaction per event-loop turn. The dedup window is not here but in the relay's
// memory (src/dedup.ts): one instance owns this file, and a healthy hot path writes nothing to disk.
import { mkdirSync } from 'node:fs';
import { join } from 'node:path';
import Database from 'better-sqlite3';
import { groupCommit, toDeadLetter, toPending, type DeadRow, type Row } from './shared.js';
import type { KeyValue, NewDelivery, PendingDelivery, Store, StoreStats } from './types.js';

const SCHEMA = `
CREATE TABLE IF NOT EXISTS outbox (
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  sink TEXT NOT NULL,
  ack_id TEXT NOT NULL,
  payload TEXT NOT NULL,
  created_at INTEGER NOT NULL,
  expires_at INTEGER NOT NULL,
  next_attempt_at INTEGER NOT NULL,
  attempts INTEGER NOT NULL DEFAULT 0,
  last_error TEXT NOT NULL DEFAULT '',
  claimed_until INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS outbox_due ON outbox (next_attempt_at, id);
CREATE INDEX IF NOT EXISTS outbox_expiry ON outbox (expires_at);
CREATE TABLE IF NOT EXISTS kv (
  ns TEXT NOT NULL,
  key TEXT NOT NULL,
  value TEXT NOT NULL,
  PRIMARY KEY (ns, key)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS dead_letters (
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  sink TEXT NOT NULL,
  ack_id TEXT NOT NULL,
  payload TEXT NOT NULL,
  created_at INTEGER NOT NULL,
  expires_at INTEGER NOT NULL,
  attempts INTEGER NOT NULL,
  last_error TEXT NOT NULL,
  failed_at INTEGER NOT NULL,
  reason TEXT NOT NULL
);
`;

export type SqliteOptions = {
  dataDir: string;
  /** The relay that owns the file frees leases a killed predecessor left behind; the CLI does not. */
  owner: boolean;
};

export function openSqliteStore({ dataDir, owner }: SqliteOptions): Store {
  mkdirSync(dataDir, { recursive: true });
  const lock = owner ? lockDataDir(dataDir) : undefined;
  const db = new Database(join(dataDir, 'push-relay.sqlite'));
  db.pragma('journal_mode = WAL');
  db.pragma('synchronous = NORMAL');
  db.pragma('busy_timeout = 5000');
  db.exec(SCHEMA);
  if (owner) db.prepare('UPDATE outbox SET claimed_until = 0 WHERE claimed_until > 0').run();

  const insert = db.prepare(
    `INSERT INTO outbox (sink, ack_id, payload, created_at, expires_at, next_attempt_at, attempts, last_error)
     VALUES (@sink, @ackId, @payload, @createdAt, @expiresAt, @nextAttemptAt, @attempts, @lastError)`,
  );
  const insertMany = db.transaction((rows: readonly NewDelivery[]) =>
    rows.map((r) => Number(insert.run(r).lastInsertRowid)),
  );
  const claimStmt = db.prepare(
    `UPDATE outbox SET claimed_until = @until WHERE id IN (
       SELECT id FROM outbox
       WHERE next_attempt_at <= @now AND claimed_until <= @now AND sink IN (SELECT value FROM json_each(@sinks))
       ORDER BY next_attempt_at, id LIMIT @limit)
     RETURNING *`,
  );
  const del = db.prepare('DELETE FROM outbox WHERE id = ?');
  const deleteMany = db.transaction((ids: readonly number[]) => {
    for (const id of ids) del.run(id);
  });
  const cancelStmt = db.prepare('DELETE FROM outbox WHERE id = ? AND claimed_until <= ?');
  const rescheduleStmt = db.prepare(
    'UPDATE outbox SET attempts = ?, next_attempt_at = ?, last_error = ?, claimed_until = 0 WHERE id = ?',
  );
  const buryInsert = db.prepare(
    `INSERT INTO dead_letters (sink, ack_id, payload, created_at, expires_at, attempts, last_error, failed_at, reason)
     VALUES (@sink, @ackId, @payload, @createdAt, @expiresAt, @attempts, @lastError, @failedAt, @reason)`,
  );
  const bury = db.transaction((row: PendingDelivery | NewDelivery, reason: string, now: number) => {
    buryInsert.run({ ...row, failedAt: now, reason });
    if ('id' in row) del.run(row.id);
  });
  const expireMove = db.prepare(
    `INSERT INTO dead_letters (sink, ack_id, payload, created_at, expires_at, attempts, last_error, failed_at, reason)
     SELECT sink, ack_id, payload, created_at, expires_at, attempts, last_error, @now,
            'expired: time to live passed after ' || attempts || ' attempt(s)' || CASE WHEN last_error != '' THEN '; last error: ' || last_error ELSE '' END
     FROM outbox WHERE expires_at <= @now AND claimed_until <= @now`,
  );
  const expireDelete = db.prepare('DELETE FROM outbox WHERE expires_at <= @now AND claimed_until <= @now');
  const expire = db.transaction((now: number) => {
    expireMove.run({ now });
    return expireDelete.run({ now }).changes;
  });

  const commits = groupCommit(insertMany);

  const kvGet = db.prepare('SELECT value FROM kv WHERE ns = ? AND key = ?').pluck();
  const kvSet = db.prepare('INSERT INTO kv (ns, key, value) VALUES (?, ?, ?) ON CONFLICT (ns, key) DO UPDATE SET value = excluded.value');
  const kvDelete = db.prepare('DELETE FROM kv WHERE ns = ? AND key = ?');
  // substr, not LIKE: a key may hold % or _.
  const kvList = db.prepare('SELECT key, value FROM kv WHERE ns = ? AND substr(key, 1, length(?)) = ? ORDER BY key');
  const kvInsertNew = db.prepare('INSERT INTO kv (ns, key, value) VALUES (?, ?, ?) ON CONFLICT (ns, key) DO NOTHING');
  const kvReplace = db.prepare('UPDATE kv SET value = ? WHERE ns = ? AND key = ? AND value = ?');
  const kvDeleteIf = db.prepare('DELETE FROM kv WHERE ns = ? AND key = ? AND value = ?');
  const kv = (ns: string): KeyValue => ({
    async get(key) {
      return kvGet.get(ns, key) as string | undefined;
    },
    async set(key, value) {
      kvSet.run(ns, key, value);
    },
    async delete(key) {
      return kvDelete.run(ns, key).changes > 0;
    },
    async list(prefix = '') {
      return (kvList.all(ns, prefix, prefix) as Array<{ key: string; value: string }>).map((r) => [r.key, r.value]);
    },
    async swap(key, expected, next) {
      if (expected === undefined) return next === undefined ? kvGet.get(ns, key) === undefined : kvInsertNew.run(ns, key, next).changes > 0;
      if (next === undefined) return kvDeleteIf.run(ns, key, expected).changes > 0;
      return kvReplace.run(next, ns, key, expected).changes > 0;
    },
  });

  return {
    kind: 'sqlite',
    enqueue: commits.enqueue,
    async claim(sinks, limit, leaseMs, now) {
      if (sinks.length === 0) return [];
      const rows = claimStmt.all({ until: now + leaseMs, now, sinks: JSON.stringify(sinks), limit }) as Row[];
      return rows.map(toPending).sort((a, b) => a.nextAttemptAt - b.nextAttemptAt || a.id - b.id);
    },
    async complete(ids) {
      if (ids.length) deleteMany(ids);
    },
    async cancel(id, now) {
      return cancelStmt.run(id, now).changes > 0;
    },
    async reschedule(id, attempts, nextAttemptAt, lastError) {
      rescheduleStmt.run(attempts, nextAttemptAt, lastError, id);
    },
    async bury(row, reason, now) {
      bury(row, reason, now);
    },
    async expire(now) {
      return expire(now);
    },
    kv,
    async stats(): Promise<StoreStats> {
      const total = db.prepare('SELECT COUNT(*) AS n, MIN(created_at) AS oldest FROM outbox').get() as { n: number; oldest: number | null };
      const dead = db.prepare('SELECT COUNT(*) AS n FROM dead_letters').get() as { n: number };
      const bySink = db.prepare('SELECT sink, COUNT(*) AS n FROM outbox GROUP BY sink').all() as Array<{ sink: string; n: number }>;
      return { depth: total.n, oldestCreatedAt: total.oldest, deadLetters: dead.n, bySink: Object.fromEntries(bySink.map((r) => [r.sink, r.n])) };
    },
    async list(limit) {
      return (db.prepare('SELECT * FROM outbox ORDER BY id LIMIT ?').all(limit) as Row[]).map(toPending);
    },
    async retryNow(sink) {
      const sql = `UPDATE outbox SET next_attempt_at = 0${sink ? ' WHERE sink = ?' : ''}`;
      return db.prepare(sql).run(...(sink ? [sink] : [])).changes;
    },
    async purge(sink) {
      const sql = `DELETE FROM outbox${sink ? ' WHERE sink = ?' : ''}`;
      return db.prepare(sql).run(...(sink ? [sink] : [])).changes;
    },
    async deadLetters(limit) {
      return (db.prepare('SELECT * FROM dead_letters ORDER BY failed_at DESC, id DESC LIMIT ?').all(limit) as DeadRow[]).map(toDeadLetter);
    },
    async replay(ids, now, ttlMs) {
      const rows = (
        ids === 'all'
          ? db.prepare('SELECT * FROM dead_letters').all()
          : db.prepare('SELECT * FROM dead_letters WHERE id IN (SELECT value FROM json_each(?))').all(JSON.stringify(ids))
      ) as DeadRow[];
      const move = db.transaction(() => {
        for (const r of rows) {
          insert.run({
            sink: r.sink,
            ackId: r.ack_id,
            payload: r.payload,
            createdAt: now,
            expiresAt: now + ttlMs(r.sink),
            nextAttemptAt: 0,
            attempts: 0,
            lastError: `replayed after: ${r.reason}`,
          });
          db.prepare('DELETE FROM dead_letters WHERE id = ?').run(r.id);
        }
      });
      move();
      return rows.length;
    },
    async close() {
      await commits.flush();
      db.close();
      lock?.close();
    },
  };
}

/**
 * One relay per data directory: a second one would free the first's leases on start (and
 * deliver the same rows again) and keep a dedup window of its own. The lock is an exclusive
 * transaction left open on a file beside the store: SQLite holds it as an OS file lock, which
 * the kernel drops when the process ends however it ends, so a SIGKILL leaves no stale lock.
 * The CLI's outbox commands read the store itself and do not need it.
 */
function lockDataDir(dataDir: string): Database.Database {
  const lock = new Database(join(dataDir, 'push-relay.lock'), { timeout: 0 });
  try {
    lock.exec('BEGIN EXCLUSIVE');
    return lock;
  } catch (err) {
    lock.close();
    if ((err as { code?: string }).code !== 'SQLITE_BUSY') throw err;
    throw new Error(
      `data directory ${dataDir} is in use by another running push-relay; give each relay its own dataDir ` +
        '(PUSH_RELAY_DATA_DIR), or let several share one outbox through a PostgreSQL store',
    );
  }
}
