// Reloading the config of a running relay: on SIGHUP and when the config file changes (as
// Mattermost's own config.json behaves). What can change live is everything a request or a
// sink reads; what the process was built around cannot, and a new config that changes it is
// refused whole, with the key named, so the relay never runs half of each.
import { createHash } from 'node:crypto';
import { readFileSync, watch, type FSWatcher } from 'node:fs';
import { basename, dirname, resolve } from 'node:path';
import type { Config } from './config.js';

/** What a reload came to: what changed, or why the running config stays. */
export type ReloadResult = { ok: true; changes: string[] } | { ok: false; problems: string[] };

/** Keys fixed for the life of the process, and why (the log line says both). */
const FIXED: ReadonlyArray<readonly [string, (c: Config) => unknown, string]> = [
  ['server.host', (c) => c.server.host, 'the listening socket'],
  ['server.port', (c) => c.server.port, 'the listening socket'],
  ['server.maxHeaderSize', (c) => c.server.maxHeaderSize, 'a node:http server option'],
  ['server.tls', (c) => c.server.tls !== undefined, 'HTTP or HTTPS is chosen at start (certificate and key files do reload)'],
  ['store', (c) => c.store, 'the outbox store'],
  ['dataDir', (c) => c.dataDir, 'the outbox store'],
  ['delivery.dedupWindow', (c) => c.delivery.dedupWindow, 'the dedup window in memory'],
  ['log.format', (c) => c.log.format, 'the log destination'],
];

/** Why `next` cannot replace `old` in a running relay: one line per key, empty when it can. */
export function liveProblems(old: Config, next: Config): string[] {
  const out: string[] = [];
  for (const [key, get, why] of FIXED) {
    if (JSON.stringify(get(old)) !== JSON.stringify(get(next))) {
      out.push(`${key}: cannot change while running (${why}); restart the relay to change it`);
    }
  }
  return out;
}

/**
 * Calls `onChange` when the file's content changes, `debounceMs` after the last event. The
 * directory is watched, not the file: editors and `kubectl` replace a file (a new inode, or
 * a symlink swapped in `..data`), which ends a watch on the file itself. A content hash keeps
 * a touch, or a write of the same bytes, from reloading.
 */
export function watchConfigFile(file: string, onChange: () => void, debounceMs = 300): { sync(): void; close(): void } {
  const path = resolve(file);
  const name = basename(path);
  const hash = () => {
    try {
      return createHash('sha256').update(readFileSync(path)).digest('hex');
    } catch {
      return 'unreadable';
    }
  };
  let last = hash();
  let timer: NodeJS.Timeout | undefined;
  let watcher: FSWatcher | undefined;
  const fire = () => {
    timer = undefined;
    const now = hash();
    if (now === last || now === 'unreadable') return;
    last = now;
    onChange();
  };
  try {
    watcher = watch(dirname(path), { persistent: false }, (_event, changed) => {
      if (changed !== null && changed !== name && !String(changed).startsWith('..')) return;
      clearTimeout(timer);
      timer = setTimeout(fire, debounceMs);
    });
    watcher.on('error', () => {});
  } catch {
    // No inotify (some containers): SIGHUP still reloads.
  }
  return {
    /** The content now in the file is what runs (a SIGHUP reload read it): no reload for it. */
    sync() {
      last = hash();
    },
    close() {
      clearTimeout(timer);
      watcher?.close();
    },
  };
}
