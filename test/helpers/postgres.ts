// A fresh PostgreSQL database per test file on the server at 127.0.0.1:5432 (our machines run
// one; .ci/run makes sure it is up), dropped afterwards.
//
// Peer policy as for mosquitto: locally an unreachable server skips with the reason printed;
// under CI=true the tests run and fail.
import pg from 'pg';
import { afterAll } from 'vitest';

export const PG_ADMIN_URL = process.env.PUSH_RELAY_TEST_PG ?? 'postgres://postgres@127.0.0.1:5432/postgres';

export async function havePostgres(): Promise<boolean> {
  const client = new pg.Client({ connectionString: PG_ADMIN_URL, connectionTimeoutMillis: 2000 });
  try {
    await client.connect();
    await client.query('SELECT 1');
    return true;
  } catch (err) {
    if (process.env.CI === 'true') return true;
    console.warn(`SKIPPED: no PostgreSQL at ${PG_ADMIN_URL} (${(err as Error).message}); under CI=true these tests fail instead.`);
    return false;
  } finally {
    await client.end().catch(() => {});
  }
}

const created: string[] = [];

/** Creates an empty database and returns its URL. */
export async function createDatabase(): Promise<string> {
  const name = `push_relay_test_${process.pid}_${Math.random().toString(36).slice(2, 8)}`;
  const admin = new pg.Client({ connectionString: PG_ADMIN_URL, connectionTimeoutMillis: 5000 });
  await admin.connect();
  try {
    await admin.query(`CREATE DATABASE ${name}`);
  } finally {
    await admin.end();
  }
  created.push(name);
  const url = new URL(PG_ADMIN_URL);
  url.pathname = `/${name}`;
  return url.toString();
}

afterAll(async () => {
  if (!created.length) return;
  const admin = new pg.Client({ connectionString: PG_ADMIN_URL, connectionTimeoutMillis: 5000 });
  await admin.connect();
  try {
    for (const name of created.splice(0)) await admin.query(`DROP DATABASE IF EXISTS ${name} WITH (FORCE)`);
  } finally {
    await admin.end();
  }
});
