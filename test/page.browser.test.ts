/// <reference lib="dom" />
/// <reference lib="dom.iterable" />
// (page.evaluate callbacks run in the browser: DOM types for this file.)
// The pairing page and its service worker in Debian's Chromium (headless, playwright-core):
// the page loads under its own CSP without a violation, the worker registers, pushes delivered
// with the DevTools command ServiceWorker.deliverPushMessage become notifications (read back
// with registration.getNotifications()), `clear` closes them, a click opens the permalink, and
// the whole pairing form runs against the local Mattermost (wrong password, MFA, paired, unpair).
//
// Two things a test browser cannot do, replaced at the browser API boundary and nowhere else:
// - pushManager.subscribe() needs the browser vendor's push service (Google's for Chromium),
//   unreachable offline: an init script replaces PushManager.prototype.subscribe/getSubscription
//   with a fake subscription (endpoint, keys, toJSON) and records the options the page passed.
//   deliverPushMessage needs no subscription, so the worker itself is the real one.
// - nothing clicks a notification (no CDP command, no notification UI in headless mode), and
//   Chromium allows clients.openWindow()/focus() only inside a real notificationclick ("Not
//   allowed to open a window." from any other event, even after a user gesture: tried). So the
//   worker runs its own click code (clickTarget, openOrFocus) for a shown notification on a test
//   message (sw.js 'push-relay:test-click') with the window API replaced by a recorder that
//   sees the real windows; the test then opens what the worker asked for, as the browser would.
import { mkdirSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import type { BrowserContext, CDPSession, Page } from 'playwright-core';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createDeviceRegistry, type DeviceRegistry } from '../src/devices.js';
import { memoryKv } from '../src/store/index.js';
import { chromiumAvailable, launchChromium, servePairing, vapidPublicKey } from './helpers/browser.js';
import { startMattermostFake, type MattermostFake } from './helpers/mattermost-fake.js';
import { REPO_ROOT } from './helpers/payloads.js';
import { tempDir } from './helpers/tmp.js';
import { until } from './helpers/wait.js';

const BOB_PASSWORD = 'bob-s3cret-Passw0rd-xyz';
const FAKE_ENDPOINT = 'https://push.example.net/wpush/v2/browser-test';

/** Replaces the one call that needs a real push service (see the header). */
const FAKE_SUBSCRIBE = `(() => {
  const sub = {
    endpoint: ${JSON.stringify(FAKE_ENDPOINT)},
    expirationTime: null,
    options: { userVisibleOnly: true, applicationServerKey: null },
    toJSON() { return { endpoint: this.endpoint, expirationTime: null, keys: { p256dh: 'BNcRdreALRFXTkOOUHK1EtK2wtaz5Ry4YfYCA_0QTpQtUbVlUls0VJXg7A8u-Ts1XbjhazAkj7I99e8QcYP7DkM', auth: 'tBHItJI5svbpez7KI4CCXg' } }; },
    async unsubscribe() { window.__subscription = null; return true; },
  };
  window.__subscribeCalls = [];
  window.__subscription = null;
  PushManager.prototype.subscribe = async function (options) {
    window.__subscribeCalls.push({ userVisibleOnly: options.userVisibleOnly, key: Array.from(new Uint8Array(options.applicationServerKey)) });
    sub.options = { userVisibleOnly: options.userVisibleOnly, applicationServerKey: options.applicationServerKey };
    window.__subscription = sub;
    return sub;
  };
  PushManager.prototype.getSubscription = async function () { return window.__subscription; };
})();`;

type Shown = { title: string; body: string; tag: string; data: Record<string, unknown> | null; icon: string };

describe.skipIf(!chromiumAvailable())('the pairing page in Chromium', () => {
  let mm: MattermostFake;
  let devices: DeviceRegistry;
  let base: string;
  let vapid: string;
  let context: BrowserContext;
  let page: Page;
  let cdp: CDPSession;
  const registrations = new Map<string, string>(); // scopeURL -> registrationId
  const consoleErrors: string[] = [];

  beforeAll(async () => {
    mm = await startMattermostFake([
      { username: 'alice', email: 'alice@example.com', password: 'alice-password-123' },
      { username: 'bob', email: 'bob@example.com', password: BOB_PASSWORD, mfaCode: '246810' },
    ]);
    devices = createDeviceRegistry(memoryKv()('devices'));
    vapid = vapidPublicKey();
    ({ base } = await servePairing({ mattermost: { url: mm.url } }, devices, { vapidPublicKey: vapid }));
    const browser = await launchChromium();
    context = await browser.newContext({ viewport: { width: 430, height: 900 }, deviceScaleFactor: 1 });
    await context.grantPermissions(['notifications'], { origin: base });
    await context.addInitScript(FAKE_SUBSCRIBE);
    page = await context.newPage();
    page.on('console', (m) => {
      if (m.type() === 'error') consoleErrors.push(m.text());
    });
    page.on('pageerror', (e) => consoleErrors.push(String(e)));
    cdp = await context.newCDPSession(page);
    cdp.on('ServiceWorker.workerRegistrationUpdated', (e: { registrations: Array<{ registrationId: string; scopeURL: string; isDeleted: boolean }> }) => {
      for (const r of e.registrations) if (!r.isDeleted) registrations.set(r.scopeURL, r.registrationId);
    });
    await cdp.send('ServiceWorker.enable');
  });

  afterAll(async () => {
    await context?.close().catch(() => {});
  });

  const shown = (): Promise<Shown[]> =>
    page.evaluate(async () => {
      const reg = await navigator.serviceWorker.ready;
      return (await reg.getNotifications()).map((n) => ({ title: n.title, body: n.body, tag: n.tag, data: n.data as Record<string, unknown> | null, icon: n.icon }));
    });

  async function push(payload: Record<string, unknown>) {
    const registrationId = await until('the service worker registration', () => registrations.get(`${base}/`), { timeoutMs: 10_000 });
    await cdp.send('ServiceWorker.deliverPushMessage', { origin: base, registrationId, data: JSON.stringify(payload) });
  }

  /** The worker's own click code on the shown notification with `tag` (see the header). */
  type Clicked = { ok: boolean; target?: string; how?: string; calls?: Array<[string, string]>; error?: string };
  /** The worker's own click code on the shown notification with `tag` (see the header). */
  const click = (tag: string) =>
    page.evaluate(
      (t) =>
        new Promise<Clicked>((resolve) => {
          const channel = new MessageChannel();
          channel.port1.onmessage = (e) => resolve(e.data as Clicked);
          navigator.serviceWorker.controller!.postMessage({ type: 'push-relay:test-click', tag: t }, [channel.port2]);
        }),
      tag,
    );

  it('loads under its CSP, registers the service worker and shows the sign-in form', async () => {
    await page.goto(base);
    await page.waitForSelector('body[data-ready="form"]', { timeout: 10_000 });
    expect(await page.textContent('#host')).toBe(new URL(mm.url).host);
    const sw = await page.evaluate(async () => {
      const reg = await navigator.serviceWorker.ready;
      return { script: reg.active?.scriptURL, scope: reg.scope, secure: window.isSecureContext };
    });
    expect(sw).toEqual({ script: `${base}/sw.js`, scope: `${base}/`, secure: true });
    expect(await page.isVisible('#login-form')).toBe(true);
    // Accessible names: every control is labelled; the status area is announced.
    const unlabelled = await page.evaluate(() =>
      [...document.querySelectorAll('input')].filter((i) => !(i as HTMLInputElement).labels?.length).map((i) => i.id),
    );
    expect(unlabelled).toEqual([]);
    expect(await page.getAttribute('#status', 'aria-live')).toBe('polite');
    expect(await page.getAttribute('#problem', 'role')).toBe('alert');
    // Keyboard: the first Tab reaches the first field, and a focus ring shows.
    await page.keyboard.press('Tab');
    expect(await page.evaluate(() => document.activeElement?.id)).toBe('login-id');
    expect(await page.evaluate(() => getComputedStyle(document.activeElement!).outlineStyle)).toBe('solid');
  });

  it('a wrong password shows what went wrong and clears the password field', async () => {
    await page.fill('#login-id', 'alice');
    await page.fill('#password', 'wrong-password');
    await page.click('#login-button');
    await page.waitForSelector('#problem:not([hidden])');
    expect(await page.textContent('#problem')).toBe('The login or the password is wrong.');
    expect(await page.inputValue('#password')).toBe('');
    expect(await page.isHidden('#mfa-field')).toBe(true);
  });

  it('pairs through the MFA step: asks for the code, then shows the paired state', async () => {
    await page.fill('#login-id', 'bob');
    await page.fill('#password', BOB_PASSWORD);
    await page.click('#login-button');
    await page.waitForSelector('#mfa-field:not([hidden])');
    expect(await page.textContent('#status')).toBe('Enter the code from your authenticator app.');
    expect(await page.evaluate(() => document.activeElement?.id)).toBe('mfa');
    await page.fill('#mfa', '246810');
    await page.click('#login-button');
    await page.waitForSelector('#paired:not([hidden])');
    expect(await page.textContent('#paired-as')).toBe(`Signed in to ${new URL(mm.url).host} as @bob. This browser: Chrome on Linux.`);
    expect(await page.inputValue('#password')).toBe('');

    // The page subscribed with the relay's VAPID key, user-visible only ...
    const calls = (await page.evaluate(() => (window as unknown as { __subscribeCalls: unknown[] }).__subscribeCalls)) as Array<{ userVisibleOnly: boolean; key: number[] }>;
    expect(calls.at(-1)?.userVisibleOnly).toBe(true);
    expect(Buffer.from(calls.at(-1)!.key).toString('base64url')).toBe(vapid);
    // ... keeps its device token, whose device holds that subscription, attached in Mattermost.
    const token = (await page.evaluate(() => localStorage.getItem('push-relay.device'))) as string;
    expect((await devices.get(token))?.targets.webpush?.[0]?.endpoint).toBe(FAKE_ENDPOINT);
    expect(mm.calls('/api/v4/users/login').at(-1)?.json).toMatchObject({ login_id: 'bob', token: '246810', device_id: `android_rn-v2:${token}` });
    // Nothing secret in the page's storage.
    const stored = await page.evaluate(() => JSON.stringify(localStorage));
    expect(stored).not.toContain(BOB_PASSWORD);
    for (const s of mm.sessions) expect(stored).not.toContain(s.token);

    // After a reload the page asks the relay and shows the same state.
    await page.reload();
    await page.waitForSelector('body[data-ready="paired"]');
    expect(await page.isVisible('#paired')).toBe(true);
  });

  it('a pushed message becomes a notification with the right title, body, tag and permalink', async () => {
    const permalink = `${mm.url}/_redirect/pl/p0st1d0000000000000000000a`;
    await push({ v: 1, type: 'message', title: 'Town Square', body: 'alice: hello from the test', tag: 'mm:chan1', post_id: 'p0st1d0000000000000000000a', channel_id: 'chan1', url: permalink, badge: 2 });
    await push({ v: 1, type: 'message', title: 'Off-Topic', body: 'carol: another channel', tag: 'mm:chan2', channel_id: 'chan2', url: mm.url });
    const list = await until('two notifications', async () => ((await shown()).length === 2 ? shown() : undefined), { timeoutMs: 10_000 });
    const town = list.find((n) => n.tag === 'mm:chan1');
    expect(town).toMatchObject({ title: 'Town Square', body: 'alice: hello from the test', icon: `${base}/icon.svg`, data: { url: permalink, type: 'message' } });
  });

  it('clear closes that channel\'s notifications and leaves the others', async () => {
    await push({ v: 1, type: 'clear', tag: 'mm:chan1', channel_id: 'chan1' });
    const left = await until('chan1 cleared', async () => {
      const l = await shown();
      return l.some((n) => n.tag === 'mm:chan1') ? undefined : l;
    });
    expect(left.map((n) => n.tag)).toEqual(['mm:chan2']);
    await push({ v: 1, type: 'clear' }); // no tag: all of ours
    await until('all cleared', async () => ((await shown()).length === 0 ? true : undefined));
  });

  it('a click opens the permalink', async () => {
    const permalink = `${mm.url}/_redirect/pl/p0st1d0000000000000000000b`;
    await push({ v: 1, type: 'message', title: 'Town Square', body: 'a message to click', tag: 'mm:chan1', url: permalink });
    await until('the notification', async () => ((await shown()).length === 1 ? true : undefined));
    const result = await click('mm:chan1');
    // No window of the chat server's origin is visible to the worker: it opens the permalink.
    expect(result).toEqual({ ok: true, target: permalink, how: 'opened', calls: [['openWindow', permalink]] });
    // What Chromium does with that call: a new window on the permalink (the fake answers it).
    const tab = await context.newPage();
    const res = await tab.goto(result.calls![0]![1]);
    expect(res?.url()).toBe(permalink);
    await tab.close();
    expect(await shown()).toEqual([]); // the click closed it
  });

  it('a session-expired push says so, and its click brings the pairing page back', async () => {
    await push({ v: 1, type: 'session', title: 'Mattermost', body: 'Session Expired: Please log in to continue receiving notifications.' });
    const [n] = await until('the session notification', async () => {
      const l = await shown();
      return l.length ? l : undefined;
    });
    expect(n).toMatchObject({ title: 'Mattermost', body: expect.stringMatching(/pairing with Mattermost has expired/), data: { url: `${base}/`, type: 'session' } });
    // The pairing page is open in a window of this origin: the worker focuses it.
    expect(await click(n!.tag)).toEqual({ ok: true, target: `${base}/`, how: 'focused', calls: [['focus', `${base}/`]] });
  });

  it('update_badge shows nothing', async () => {
    await push({ v: 1, type: 'update_badge', badge: 3 });
    await push({ v: 1, type: 'message', title: 'marker', body: 'after the badge', tag: 'mm:marker' });
    const list = await until('the marker', async () => {
      const l = await shown();
      return l.some((x) => x.tag === 'mm:marker') ? l : undefined;
    }, { timeoutMs: 20_000 });
    expect(list.map((x) => x.title)).toEqual(['marker']);
    await push({ v: 1, type: 'clear' });
  });

  it('"send me a test notification", then unpair: Mattermost logs the session out and the form is back', async () => {
    await page.click('#test-button');
    await until('the test answer', async () => ((await page.textContent('#status'))?.startsWith('Test notification sent') ? true : undefined));
    const token = (await page.evaluate(() => localStorage.getItem('push-relay.device'))) as string;
    const sessionToken = (await devices.get(token))!.session!.token;
    await page.click('#unpair-button');
    await page.waitForSelector('#pair:not([hidden])');
    expect(await page.textContent('#status')).toMatch(/^Unpaired/);
    expect(mm.calls('/api/v4/users/logout').at(-1)?.headers.authorization).toBe(`Bearer ${sessionToken}`);
    expect(await devices.get(token)).toBeUndefined();
    expect(await page.evaluate(() => localStorage.getItem('push-relay.device'))).toBeNull();
    expect(await page.evaluate(() => (window as unknown as { __subscription: unknown }).__subscription)).toBeNull();
  });

  it('had no console error and no CSP violation throughout', () => {
    // The sign-in answers 401 on purpose (wrong password, MFA step); Chromium logs each such fetch.
    const expected = /^Failed to load resource: the server responded with a status of 401 \(Unauthorized\)$/;
    expect(consoleErrors.filter((e) => !expected.test(e))).toEqual([]);
    expect(consoleErrors.length).toBeLessThanOrEqual(3);
  });

  it('text and controls have WCAG AA contrast (4.5:1) in light and dark mode', async () => {
    const p = await context.newPage();
    await p.goto(base);
    await p.waitForSelector('body[data-ready]');
    for (const scheme of ['light', 'dark'] as const) {
      await p.emulateMedia({ colorScheme: scheme });
      const ratios = await p.evaluate(() => {
        // Show every kind of text the page has, whichever state it is in.
        for (const id of ['pair', 'paired', 'problem', 'expired', 'ios-install', 'email-field', 'repair-button']) document.getElementById(id)!.hidden = false;
        document.getElementById('problem')!.textContent = 'A problem';
        document.getElementById('status')!.textContent = 'A status';
        const rgb = (c: string) => (c.match(/[\d.]+/g) ?? []).map(Number);
        const lum = ([r, g, b]: number[]) => {
          const f = (v: number) => ((v /= 255) <= 0.03928 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4);
          return 0.2126 * f(r!) + 0.7152 * f(g!) + 0.0722 * f(b!);
        };
        const background = (el: Element | null): number[] => {
          for (; el; el = el.parentElement) {
            const c = rgb(getComputedStyle(el).backgroundColor);
            if (c.length === 3 || (c[3] ?? 0) > 0) return c.slice(0, 3);
          }
          return [255, 255, 255];
        };
        const out: Record<string, number> = {};
        for (const sel of ['h1', 'h2', '#intro', '.hint', 'label', '.optional', 'button', 'button.secondary', 'button.danger', 'summary', '#problem', '#status', 'footer p', '.notice p']) {
          const el = document.querySelector(sel)!;
          const [a, b] = [lum(rgb(getComputedStyle(el).color)), lum(background(el))];
          out[sel] = Math.round(((Math.max(a, b) + 0.05) / (Math.min(a, b) + 0.05)) * 100) / 100;
        }
        return out;
      });
      for (const [sel, ratio] of Object.entries(ratios)) expect(ratio, `${scheme} ${sel}: ${ratio}`).toBeGreaterThanOrEqual(4.5);
    }
    await p.close();
  });

  it('screenshots for the README (docs/pairing.png with UPDATE_SCREENSHOTS=1)', async () => {
    // The screenshots name a plausible server instead of the fake's 127.0.0.1:<port>.
    const shots = process.env.UPDATE_SCREENSHOTS === '1' ? join(REPO_ROOT, 'docs') : tempDir('push-relay-shots-');
    mkdirSync(shots, { recursive: true });
    const p = await context.newPage();
    await p.route(`${base}/pair/config`, async (route) => {
      const res = await route.fetch();
      const body = (await res.json()) as { mattermost: Record<string, unknown> };
      body.mattermost.host = 'chat.example.com';
      await route.fulfill({ response: res, json: body });
    });
    await p.goto(base);
    await p.waitForSelector('body[data-ready="form"]');
    await p.screenshot({ path: join(shots, 'pairing.png'), fullPage: true });
    await p.emulateMedia({ colorScheme: 'dark' });
    await p.screenshot({ path: join(shots, 'pairing-dark.png'), fullPage: true });
    // The home-screen icons (iOS takes only PNG), drawn from icon.svg on its own blue.
    await p.emulateMedia({ colorScheme: 'light' });
    await p.goto('about:blank'); // out of the page's CSP, which forbids the inline styles below
    const svg = readFileSync(join(REPO_ROOT, 'src', 'page', 'icon.svg'), 'utf8');
    const icons = process.env.UPDATE_SCREENSHOTS === '1' ? join(REPO_ROOT, 'src', 'page') : shots;
    for (const [file, size] of [['apple-touch-icon.png', 180], ['icon-192.png', 192], ['icon-512.png', 512]] as const) {
      await p.setViewportSize({ width: size, height: size });
      await p.setContent(
        `<body style="margin:0;background:#1c58d9">${svg.replace('<svg ', `<svg width="${size}" height="${size}" style="display:block" `)}</body>`,
      );
      await p.screenshot({ path: join(icons, file) });
    }
    await p.close();
  });
});
