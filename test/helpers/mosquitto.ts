// A real mosquitto broker per test file, on a random 127.0.0.1 port, with no persistence.
//
// Peer policy: locally a missing mosquitto skips the tests that need it (with the reason
// printed); under CI=true those tests run and fail, so a broken CI image cannot pass green.
import { spawn, type ChildProcess } from 'node:child_process';
import { chmodSync, existsSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll } from 'vitest';
import { freePort } from './ports.js';
import { tempDir } from './tmp.js';
import { accepts, GiveUp, sleep, until } from './wait.js';

const CANDIDATES = ['/usr/sbin/mosquitto', '/usr/local/sbin/mosquitto', '/opt/homebrew/sbin/mosquitto'];

export const MOSQUITTO_BIN: string =
  process.env.MOSQUITTO_BIN ?? CANDIDATES.find((p) => existsSync(p)) ?? (CANDIDATES[0] as string);

let warned = false;

/** Whether tests that need mosquitto should run: yes when it is installed, and always under CI. */
export function haveMosquitto(): boolean {
  if (existsSync(MOSQUITTO_BIN)) return true;
  if (process.env.CI === 'true') return true;
  if (!warned) {
    warned = true;
    console.warn(
      `SKIPPED: mosquitto not found at ${MOSQUITTO_BIN}; install it (apt-get install mosquitto) or set MOSQUITTO_BIN. Under CI=true these tests fail instead.`,
    );
  }
  return false;
}

export type Mosquitto = {
  port: number;
  url: string;
  /** What mosquitto wrote to stderr (its log), for failure messages. */
  log: string[];
  /** SIGTERM, then SIGKILL if it does not exit within 3 s. */
  stop(): Promise<void>;
  /** SIGKILL: the broker vanishes without a goodbye. */
  kill(): Promise<void>;
  /** SIGSTOP: the broker keeps its sockets open but answers nothing. */
  pause(): void;
  /** SIGCONT. */
  resume(): void;
  /** SIGHUP: mosquitto re-reads its config and ACL file. */
  reload(): void;
  /** Stops it and starts a fresh one on the same port. */
  restart(): Promise<void>;
};

const running = new Set<ChildProcess>();

export type MosquittoOptions = {
  /**
   * Keep sessions and queued messages on disk across restarts, saved after every change: a
   * subscriber with a persistent session (clean: false) then misses nothing while the broker
   * is away or restarted.
   */
  persistent?: boolean;
  /** More mosquitto.conf lines, e.g. `acl_file /path`. */
  extra?: string[];
};

export async function startMosquitto(opts: MosquittoOptions = {}): Promise<Mosquitto> {
  if (!existsSync(MOSQUITTO_BIN)) throw new Error(`mosquitto binary not found at ${MOSQUITTO_BIN} (set MOSQUITTO_BIN)`);
  const port = await freePort();
  const dir = tempDir('push-relay-mosquitto-');
  // Started as root, mosquitto drops to its own user, which must write its persistence file here.
  if (opts.persistent) chmodSync(dir, 0o777);
  const conf = join(dir, 'mosquitto.conf');
  const persistence = opts.persistent
    ? ['persistence true', `persistence_location ${dir}/`, 'autosave_interval 1', 'autosave_on_changes true', 'max_queued_messages 0']
    : ['persistence false'];
  writeFileSync(
    conf,
    [`listener ${port} 127.0.0.1`, 'allow_anonymous true', ...persistence, ...(opts.extra ?? []), 'log_dest stderr', 'log_type error', 'log_type warning', 'log_type notice', ''].join('\n'),
  );
  const log: string[] = [];
  let proc = await launch(conf, port, log);
  let paused = false;

  async function terminate(signal: NodeJS.Signals) {
    const p = proc;
    if (p.exitCode !== null || p.signalCode !== null) return;
    if (paused) {
      p.kill('SIGCONT');
      paused = false;
    }
    const exited = new Promise<void>((resolve) => p.once('exit', () => resolve()));
    p.kill(signal);
    const timer = sleep(3000).then(() => 'timeout' as const);
    if ((await Promise.race([exited, timer])) === 'timeout') {
      p.kill('SIGKILL');
      await exited;
    }
  }

  return {
    port,
    url: `mqtt://127.0.0.1:${port}`,
    log,
    stop: () => terminate('SIGTERM'),
    kill: () => terminate('SIGKILL'),
    pause() {
      proc.kill('SIGSTOP');
      paused = true;
    },
    resume() {
      proc.kill('SIGCONT');
      paused = false;
    },
    reload() {
      proc.kill('SIGHUP');
    },
    async restart() {
      await terminate('SIGTERM');
      proc = await launch(conf, port, log);
    },
  };
}

async function launch(conf: string, port: number, log: string[]): Promise<ChildProcess> {
  const proc = spawn(MOSQUITTO_BIN, ['-c', conf], { stdio: ['ignore', 'ignore', 'pipe'] });
  running.add(proc);
  proc.once('exit', () => running.delete(proc));
  proc.stderr?.setEncoding('utf8').on('data', (chunk: string) => log.push(...chunk.split('\n').filter(Boolean)));
  try {
    await until(`mosquitto to accept connections on 127.0.0.1:${port}`, async () => {
      if (proc.exitCode !== null) throw new GiveUp(`mosquitto exited with code ${proc.exitCode}: ${log.join(' | ')}`);
      return accepts(port, 200);
    }, { timeoutMs: 5000, intervalMs: 25 });
  } catch (err) {
    proc.kill('SIGKILL');
    throw err;
  }
  return proc;
}

afterAll(async () => {
  const procs = [...running];
  for (const p of procs) {
    p.kill('SIGCONT');
    p.kill('SIGKILL');
  }
  await Promise.all(procs.map((p) => (p.exitCode === null && p.signalCode === null ? new Promise((r) => p.once('exit', r)) : undefined)));
});

process.once('exit', () => {
  for (const p of running) p.kill('SIGKILL');
});
