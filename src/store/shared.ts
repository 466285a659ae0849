// What the SQLite and PostgreSQL stores share: the row shape and group commit.
import type { DeadLetter, NewDelivery, PendingDelivery } from './types.js';

/** An outbox row as either driver returns it (PostgreSQL's BIGINT arrives as a string). */
export type Row = {
  id: number | string;
  sink: string;
  ack_id: string;
  payload: string;
  created_at: number | string;
  expires_at: number | string;
  next_attempt_at: number | string;
  attempts: number;
  last_error: string;
};
export type DeadRow = Row & { failed_at: number | string; reason: string };

// Our numbers are epoch milliseconds and ids: well inside 2^53.
export const toPending = (r: Row): PendingDelivery => ({
  id: Number(r.id),
  sink: r.sink,
  ackId: r.ack_id,
  payload: r.payload,
  createdAt: Number(r.created_at),
  expiresAt: Number(r.expires_at),
  nextAttemptAt: Number(r.next_attempt_at),
  attempts: r.attempts,
  lastError: r.last_error,
});

export const toDeadLetter = (r: DeadRow): DeadLetter => ({ ...toPending(r), failedAt: Number(r.failed_at), reason: r.reason });

/**
 * Group commit: every enqueue made in one event-loop turn is written by one `write` call (one
 * transaction), and each caller learns its rows' ids once that write is durable.
 */
export function groupCommit(write: (rows: NewDelivery[]) => number[] | Promise<number[]>) {
  let batch: Array<{ rows: readonly NewDelivery[]; resolve: (ids: number[]) => void; reject: (e: unknown) => void }> = [];
  async function flush(): Promise<void> {
    const current = batch;
    batch = [];
    if (current.length === 0) return;
    try {
      const ids = await write(current.flatMap((b) => b.rows));
      let i = 0;
      for (const b of current) {
        b.resolve(ids.slice(i, i + b.rows.length));
        i += b.rows.length;
      }
    } catch (err) {
      for (const b of current) b.reject(err);
    }
  }
  return {
    enqueue(rows: readonly NewDelivery[]): Promise<number[]> {
      return new Promise((resolve, reject) => {
        if (batch.length === 0) setImmediate(() => void flush());
        batch.push({ rows, resolve, reject });
      });
    },
    flush,
  };
}
