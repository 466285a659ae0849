// Two ways to run the relay under test:
// - in-process (`startTestRelay`): the real HTTP server and sinks, config through the same
//   parser a user's file goes through, a silent logger;
// - as the user runs it (`spawnRelay`): `node dist/src/cli.js serve`, env overrides, its log
//   lines collected, signals delivered for real.
import { spawn, type ChildProcess } from 'node:child_process';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { createInterface } from 'node:readline';
import pino, { type Logger } from 'pino';
import { afterAll } from 'vitest';
import { parseConfig } from '../../src/config.js';
import { startRelay, type Relay } from '../../src/relay.js';
import { get } from './http.js';
import { REPO_ROOT } from './payloads.js';
import { freePort } from './ports.js';
import { tempDir } from './tmp.js';
import { GiveUp, sleep, until } from './wait.js';

export const CLI = join(REPO_ROOT, 'dist', 'src', 'cli.js');

const relays = new Set<Relay>();
const children = new Set<ChildProcess>();

/**
 * Starts the relay in this process on 127.0.0.1 and a kernel-chosen port, with `store: none`,
 * unless `raw` says otherwise. `env` feeds `${VAR}` and the PUSH_RELAY_* overrides (nothing
 * leaks in from the real environment).
 */
export async function startTestRelay(
  raw: Record<string, unknown>,
  { env = {}, logger = pino({ level: 'silent' }) }: { env?: Record<string, string>; logger?: Logger } = {},
): Promise<Relay> {
  const server = { host: '127.0.0.1', port: 0, ...(raw.server as Record<string, unknown> | undefined) };
  // No outbox unless a test asks for one: the reply then says what the sinks did right now.
  const store = raw.store ?? 'none';
  const relay = await startRelay(parseConfig({ ...raw, server, store }, env), logger);
  relays.add(relay);
  const stop = relay.stop;
  return Object.assign(relay, {
    /** relay.stop(), bounded: a stop that hangs fails the test instead of the hook timing out. */
    stop: async (timeoutMs = 10_000) => {
      relays.delete(relay);
      const timeout = sleep(timeoutMs).then(() => 'timeout' as const);
      if ((await Promise.race([stop(), timeout])) === 'timeout') throw new Error(`relay.stop() did not finish within ${timeoutMs} ms`);
    },
  });
}

export type LogLine = Record<string, unknown> & { msg?: string; level?: number };

export type RelayProcess = {
  url: string;
  port: number;
  proc: ChildProcess;
  /** Every line written to stdout and stderr so far. */
  lines: string[];
  /** The lines that parse as JSON (pino's output with PUSH_RELAY_LOG_FORMAT=json). */
  logs(): LogLine[];
  /** Resolves with the exit code and signal once the process ends. */
  exited: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
  waitForLine(pattern: RegExp, timeoutMs?: number): Promise<string>;
  /** Sends `signal` (default SIGTERM) and waits up to `timeoutMs` for the exit; SIGKILL after that. */
  stop(signal?: NodeJS.Signals, timeoutMs?: number): Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
  kill(): Promise<void>;
};

export type SpawnOptions = {
  /** Written to a temp .json file and passed as `--config FILE`. */
  config?: Record<string, unknown>;
  /** Arguments after `node dist/src/cli.js`; default `serve` (+ `--config FILE` when `config` is given). */
  args?: string[];
  /** Added to the child's environment; undefined removes a variable. */
  env?: Record<string, string | undefined>;
  /** Wait until GET /healthz answers (default true). */
  waitReady?: boolean;
  readyTimeoutMs?: number;
};

/** The environment without any PUSH_RELAY_* of the developer's shell. */
function cleanEnv(): Record<string, string> {
  const env: Record<string, string> = {};
  for (const [k, v] of Object.entries(process.env)) if (v !== undefined && !k.startsWith('PUSH_RELAY_')) env[k] = v;
  return env;
}

export async function spawnRelay(opts: SpawnOptions = {}): Promise<RelayProcess> {
  const port = await freePort();
  const args = [...(opts.args ?? ['serve'])];
  if (opts.config) {
    const file = join(tempDir('push-relay-config-'), 'config.json');
    writeFileSync(file, JSON.stringify(opts.config, null, 2));
    args.push('--config', file);
  }
  const env: Record<string, string> = {
    ...cleanEnv(),
    PUSH_RELAY_HOST: '127.0.0.1',
    PUSH_RELAY_PORT: String(port),
    PUSH_RELAY_LOG_FORMAT: 'json',
    PUSH_RELAY_LOG_LEVEL: 'info',
    // The default sqlite outbox lives in dataDir: keep it out of the checkout.
    PUSH_RELAY_DATA_DIR: tempDir('push-relay-data-'),
  };
  for (const [k, v] of Object.entries(opts.env ?? {})) {
    if (v === undefined) delete env[k];
    else env[k] = v;
  }
  const proc = spawn(process.execPath, [CLI, ...args], { cwd: REPO_ROOT, env, stdio: ['ignore', 'pipe', 'pipe'] });
  children.add(proc);
  const lines: string[] = [];
  const listeners = new Set<() => void>();
  for (const stream of [proc.stdout, proc.stderr]) {
    createInterface({ input: stream! }).on('line', (line) => {
      lines.push(line);
      for (const l of listeners) l();
    });
  }
  const exited = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((resolve) =>
    proc.once('exit', (code, signal) => {
      children.delete(proc);
      // Let readline deliver the last lines before anyone reads them.
      setTimeout(() => resolve({ code, signal }), 50);
    }),
  );
  const url = `http://127.0.0.1:${port}`;

  const handle: RelayProcess = {
    url,
    port,
    proc,
    lines,
    logs: () =>
      lines.flatMap((l) => {
        try {
          const v = JSON.parse(l) as unknown;
          return v && typeof v === 'object' ? [v as LogLine] : [];
        } catch {
          return [];
        }
      }),
    exited,
    waitForLine(pattern, timeoutMs = 5000) {
      const hit = () => lines.find((l) => pattern.test(l));
      const found = hit();
      if (found !== undefined) return Promise.resolve(found);
      return new Promise((resolve, reject) => {
        const check = () => {
          const line = hit();
          if (line === undefined) return;
          clearTimeout(timer);
          listeners.delete(check);
          resolve(line);
        };
        const timer = setTimeout(() => {
          listeners.delete(check);
          reject(new Error(`no output line matched ${pattern} within ${timeoutMs} ms; output:\n${lines.join('\n')}`));
        }, timeoutMs);
        listeners.add(check);
      });
    },
    async stop(signal = 'SIGTERM', timeoutMs = 15_000) {
      if (proc.exitCode === null && proc.signalCode === null) proc.kill(signal);
      const timeout = sleep(timeoutMs).then(() => 'timeout' as const);
      const result = await Promise.race([exited, timeout]);
      if (result === 'timeout') {
        proc.kill('SIGKILL');
        throw new Error(`relay did not exit within ${timeoutMs} ms of ${signal}; last output:\n${lines.slice(-15).join('\n')}`);
      }
      return result;
    },
    async kill() {
      if (proc.exitCode === null && proc.signalCode === null) proc.kill('SIGKILL');
      await exited;
    },
  };

  if (opts.waitReady !== false) {
    try {
      await until(
        `the relay to answer GET ${url}/healthz`,
        async () => {
          if (proc.exitCode !== null) throw new GiveUp(`relay exited with code ${proc.exitCode}:\n${lines.join('\n')}`);
          return (await get(`${url}/healthz`, { timeoutMs: 500 })).status === 200;
        },
        { timeoutMs: opts.readyTimeoutMs ?? 10_000, intervalMs: 50 },
      );
    } catch (err) {
      await handle.kill();
      throw err;
    }
  }
  return handle;
}

afterAll(async () => {
  await Promise.all([...relays].map((r) => Promise.race([r.stop().catch(() => {}), sleep(5000)])));
  relays.clear();
  const procs = [...children];
  for (const p of procs) p.kill('SIGKILL');
  await Promise.all(procs.map((p) => (p.exitCode === null && p.signalCode === null ? new Promise((r) => p.once('exit', r)) : undefined)));
});

process.once('exit', () => {
  for (const p of children) p.kill('SIGKILL');
});

/** Runs `node dist/src/cli.js ...args` to completion (bounded) and returns what it printed. */
export function runCli(
  args: string[],
  { env = {}, timeoutMs = 10_000 }: { env?: Record<string, string | undefined>; timeoutMs?: number } = {},
): Promise<{ code: number | null; signal: NodeJS.Signals | null; stdout: string; stderr: string }> {
  const full: Record<string, string> = { ...cleanEnv() };
  for (const [k, v] of Object.entries(env)) {
    if (v === undefined) delete full[k];
    else full[k] = v;
  }
  return new Promise((resolve, reject) => {
    const proc = spawn(process.execPath, [CLI, ...args], { cwd: REPO_ROOT, env: full, stdio: ['ignore', 'pipe', 'pipe'] });
    children.add(proc);
    let stdout = '';
    let stderr = '';
    proc.stdout.setEncoding('utf8').on('data', (c: string) => (stdout += c));
    proc.stderr.setEncoding('utf8').on('data', (c: string) => (stderr += c));
    const timer = setTimeout(() => {
      proc.kill('SIGKILL');
      reject(new Error(`push-relay ${args.join(' ')} did not exit within ${timeoutMs} ms; stdout:\n${stdout}\nstderr:\n${stderr}`));
    }, timeoutMs);
    proc.once('close', (code, signal) => {
      clearTimeout(timer);
      children.delete(proc);
      resolve({ code, signal, stdout, stderr });
    });
  });
}
