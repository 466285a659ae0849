// The durable store behind the outbox: where a delivery lives once the relay has answered
// OK for it but the sink has not taken it yet, and where it goes when it cannot be delivered.
// SQLite for one instance, PostgreSQL for several sharing one outbox and one dedup window.

/** A delivery to write: one notification for one sink. */
export type NewDelivery = {
  sink: string;
  ackId: string;
  /** The validated notification as JSON. */
  payload: string;
  createdAt: number;
  expiresAt: number;
  nextAttemptAt: number;
  attempts: number;
  lastError: string;
};

export type PendingDelivery = NewDelivery & { id: number };
export type DeadLetter = PendingDelivery & { failedAt: number; reason: string };

export type StoreStats = {
  depth: number;
  oldestCreatedAt: number | null;
  deadLetters: number;
  bySink: Record<string, number>;
};

/**
 * A namespace of keys and string values in the store, for a sink's own state and the device
 * registry. Same behaviour on SQLite, PostgreSQL (shared by every instance on it) and memory.
 */
export interface KeyValue {
  get(key: string): Promise<string | undefined>;
  set(key: string, value: string): Promise<void>;
  /** True when the key existed. */
  delete(key: string): Promise<boolean>;
  /** Every entry whose key starts with `prefix` (all without one), in key order. */
  list(prefix?: string): Promise<Array<[key: string, value: string]>>;
  /**
   * Sets `key` to `next` only if its value is still `expected`, atomically (across the instances
   * sharing a PostgreSQL too); true when it did. `next` undefined deletes; `expected` undefined
   * means "absent". What a read-modify-write that must not lose a concurrent change is built on.
   */
  swap(key: string, expected: string | undefined, next: string | undefined): Promise<boolean>;
}

export interface Store {
  readonly kind: 'sqlite' | 'postgres';
  /** Durable when the promise resolves: the relay answers OK only after that. */
  enqueue(rows: readonly NewDelivery[]): Promise<number[]>;
  /**
   * Takes up to `limit` due deliveries for the given sinks and leases them for `leaseMs`:
   * no other worker (in this process or another instance) gets them until the lease ends.
   */
  claim(sinks: readonly string[], limit: number, leaseMs: number, now: number): Promise<PendingDelivery[]>;
  /** Delivered (or given up on): remove. */
  complete(ids: readonly number[]): Promise<void>;
  /** Removes a delivery nobody has claimed; false if it was claimed or is gone. */
  cancel(id: number, now: number): Promise<boolean>;
  reschedule(id: number, attempts: number, nextAttemptAt: number, lastError: string): Promise<void>;
  /** Moves a delivery (pending, or one that never reached the outbox) to the dead letters with the reason. */
  bury(row: PendingDelivery | NewDelivery, reason: string, now: number): Promise<void>;
  /** Moves every delivery past its time to live to the dead letters; returns how many. */
  expire(now: number): Promise<number>;

  /**
   * A dedup window shared by every instance on this store (PostgreSQL); absent where one
   * instance owns the store and the window lives in its memory (SQLite).
   */
  readonly dedup?: {
    /** Claims (ackId, sink) for `windowMs`; false when it was claimed already within the window. */
    acquire(ackId: string, sink: string, windowMs: number, now: number): Promise<boolean>;
    release(ackId: string, sink: string): Promise<void>;
  };
  /** The key-value namespace `namespace`. */
  kv(namespace: string): KeyValue;

  stats(): Promise<StoreStats>;
  list(limit: number): Promise<PendingDelivery[]>;
  /** Makes every pending delivery (or those of one sink) due now; returns how many. */
  retryNow(sink?: string): Promise<number>;
  purge(sink?: string): Promise<number>;
  deadLetters(limit: number): Promise<DeadLetter[]>;
  /** Moves dead letters back to the outbox, due now, with a fresh time to live. */
  replay(ids: readonly number[] | 'all', now: number, ttlMs: (sink: string) => number): Promise<number>;
  close(): Promise<void>;
}
