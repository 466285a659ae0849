// The service worker: turns the relay's Web Push payloads into notifications.
//
// The payload (JSON, agreed with the webpush sink): { v: 1, type, sub_type?, title?, body?,
// tag? ("mm:<channel_id>"), post_id?, channel_id?, team_id?, root_id?, sender_name?,
// server_id?, ack_id?, url?, badge? }; never more than Mattermost's push carried.
//   message, test, other types -> a notification (title, body, icon, tag, data.url)
//   clear        -> close the notifications with that tag (all of ours without a tag)
//   update_badge -> the app badge, where the browser has one (Badging API)
//   session      -> "your pairing expired"; a click opens this page to pair again
// A click focuses a window already on the notification's URL, or opens it.
'use strict';

const ICON = new URL('icon.svg', self.registration.scope).href;
const SESSION_TAG = 'push-relay:session';

self.addEventListener('install', () => self.skipWaiting());
self.addEventListener('activate', (event) => event.waitUntil(self.clients.claim()));

self.addEventListener('push', (event) => {
  event.waitUntil(handlePush(readPayload(event.data)));
});

self.addEventListener('notificationclick', (event) => {
  event.notification.close();
  event.waitUntil(openOrFocus(clickTarget(event.notification.data), self.clients));
});

/**
 * For the browser tests, since nothing can click a notification in a test browser and Chromium
 * allows clients.openWindow() and WindowClient.focus() only inside a real notificationclick:
 * {type: 'push-relay:test-click', tag} runs the click handler's own code (clickTarget,
 * openOrFocus) on the shown notification with that tag, with the window API replaced by a
 * recorder (the windows it sees are the real ones; opening and focusing are only recorded).
 * Only this origin's pages can message the worker, and nothing is opened.
 */
self.addEventListener('message', (event) => {
  const msg = event.data || {};
  if (msg.type !== 'push-relay:test-click') return;
  const port = event.ports && event.ports[0];
  const reply = (answer) => port && port.postMessage(answer);
  event.waitUntil(
    self.registration.getNotifications(msg.tag ? { tag: msg.tag } : undefined).then(async (shown) => {
      const n = shown[0];
      if (!n) return reply({ ok: false, error: 'no notification with that tag' });
      n.close();
      const calls = [];
      const recorder = {
        matchAll: (options) =>
          self.clients.matchAll(options).then((windows) =>
            windows.map((w) => ({ url: w.url, focus: async () => void calls.push(['focus', w.url]) })),
          ),
        openWindow: async (url) => void calls.push(['openWindow', url]),
      };
      const target = clickTarget(n.data);
      try {
        const how = await openOrFocus(target, recorder);
        reply({ ok: true, target, how, calls });
      } catch (err) {
        reply({ ok: false, target, error: String(err && err.message ? err.message : err) });
      }
    }),
  );
});

function readPayload(data) {
  if (!data) return { type: 'message' };
  try {
    const p = data.json();
    return p && typeof p === 'object' ? p : { type: 'message', body: String(p) };
  } catch (_) {
    return { type: 'message', body: data.text() };
  }
}

async function handlePush(p) {
  switch (p.type) {
    case 'clear':
      await closeTagged(p.tag);
      if (typeof p.badge === 'number') await setBadge(p.badge);
      return;
    case 'update_badge':
      return setBadge(typeof p.badge === 'number' ? p.badge : 0);
    case 'session':
      return self.registration.showNotification(p.title || 'Mattermost', {
        body: 'Your pairing with Mattermost has expired. Tap to open the pairing page and sign in again.',
        icon: ICON,
        tag: SESSION_TAG,
        data: { url: self.registration.scope, type: 'session' },
      });
    default: {
      const options = { body: p.body || '', icon: ICON, data: { url: p.url || null, type: p.type || 'message', post_id: p.post_id || null } };
      // A call rings until answered or dismissed (Calls plugin: sub_type calls, contract §2.2).
      if (p.sub_type === 'calls') options.requireInteraction = true;
      if (p.tag) {
        options.tag = p.tag;
        // A channel's new message replaces its last one: say so again rather than silently.
        options.renotify = true;
      }
      await self.registration.showNotification(p.title || 'Mattermost', options);
      if (typeof p.badge === 'number' && p.badge >= 0) await setBadge(p.badge);
    }
  }
}

async function closeTagged(tag) {
  const shown = await self.registration.getNotifications(tag ? { tag } : undefined);
  for (const n of shown) n.close();
}

/**
 * Badging API (Chromium desktop apps, Safari home-screen apps); elsewhere nothing to do.
 * Bounded: where the browser has no app to badge, its promise may never settle, and a push
 * event that never finishes holds up the pushes after it.
 */
async function setBadge(count) {
  const nav = self.navigator;
  const bounded = (p) => Promise.race([p, new Promise((resolve) => setTimeout(resolve, 1000))]);
  try {
    if (count > 0 && nav.setAppBadge) await bounded(nav.setAppBadge(count));
    else if (count <= 0 && nav.clearAppBadge) await bounded(nav.clearAppBadge());
  } catch (_) {
    /* not allowed here (no installed app): the badge is optional */
  }
}

/** Where a click goes: the post's permalink (or the server) from the payload; the pairing page for a session notice. */
function clickTarget(data) {
  if (data && data.type === 'session') return self.registration.scope;
  return (data && data.url) || self.registration.scope;
}

/**
 * Focuses a window already showing `url` or opens it. `clients.matchAll` sees only windows of
 * this origin (the pairing page), so a Mattermost permalink on the chat server's origin always
 * opens a new window, which Mattermost's own web app then takes over.
 */
async function openOrFocus(url, clients) {
  const windows = await clients.matchAll({ type: 'window', includeUncontrolled: true });
  for (const w of windows) {
    if (w.url === url && 'focus' in w) {
      await w.focus();
      return 'focused';
    }
  }
  await clients.openWindow(url);
  return 'opened';
}
