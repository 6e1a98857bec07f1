// Type declarations for fleetcast-client.js (docs/web-demo.md describes the API).

/** The protocol version this client speaks (a Hello of another version is refused). */
export declare const PROTOCOL_VERSION: number;

/** A transport a session runs on. */
export type Transport = 'webtransport' | 'websocket';

/**
 * Where a connection is: `connecting` (the first attempt), `live` (a session is open and ticks
 * arrive), `stale` (a session is open but no tick came for `staleAfterMs`), `reconnecting`
 * (waiting `retryInMs` or trying again), `paused` (the page is hidden), `offline` (closed, or
 * no server this client can read: nothing more will happen).
 */
export type State = 'connecting' | 'live' | 'stale' | 'reconnecting' | 'paused' | 'offline';

/** Every State, in the order a connection usually meets them. */
export declare const STATES: readonly State[];

/** The options of `connect`. */
export interface ConnectOptions {
  /** Base URL(s) of the server's HTTP side (several for a multi-node deployment). Default: the page's directory. */
  server?: string | readonly string[] | null;
  /** 'auto' (default: WebTransport, else the WebSocket), or one transport only. */
  transport?: 'auto' | Transport;
  /** Subscriber token, or a function called before every attempt (for tokens that expire). */
  token?: string | null | (() => string | null | undefined | Promise<string | null | undefined>);
  /** Longest wait for a fetch or a session to open, ms (default 5000). */
  openTimeoutMs?: number;
  /** No tick for this long on an open session: state 'stale' (default null: 3 tick intervals). */
  staleAfterMs?: number | null;
  /** No tick for this long: the session is given up and opened again (default null: 10 intervals, at least 10 s). */
  deadAfterMs?: number | null;
  /** How long the page may stay hidden before the session pauses, ms; false: never pause (default 5000). */
  pauseWhenHidden?: number | false;
}

/** The default of every option. */
export declare const DEFAULTS: Readonly<{
  server: null;
  transport: 'auto';
  token: null;
  openTimeoutMs: number;
  staleAfterMs: null;
  deadAfterMs: null;
  pauseWhenHidden: number;
}>;

/** A car with a known position. */
export interface Car {
  /** The server's id for the car (never reused by one server process). */
  id: number;
  label: string;
  /** Degrees (WGS 84). */
  lat: number;
  lon: number;
  /** Degrees clockwise from north. */
  headingDeg: number;
  /** Metres per second. */
  speedMps: number;
  /** Seconds since the car's fix was taken, as of the moment this object was made. */
  ageS: number;
  /** When the fix was taken, on this machine's clock (ms since the Unix epoch). */
  fixTimeMs: number;
  /** The tick the car's position came from. */
  tick: number;
}

/** The served area, degrees. */
export interface Area {
  south: number;
  west: number;
  north: number;
  east: number;
}

/** How a session ended: its close code (null when the connection was lost) and reason. */
export interface CloseInfo {
  code: number | null;
  reason: string;
}

/** Counters over every session of a connection. */
export interface Stats {
  sessions: number;
  reconnects: number;
  ticksReceived: number;
  ticksMissed: number;
  ticksComplete: number;
  bytesReceived: number;
  badDatagrams: number;
  /** Median ms from a tick's server time to its arrival (includes any clock difference). */
  latencyP50Ms: number | null;
  /** Cars in the initial state of the session shown. */
  initialCars: number | null;
  /** The newest tick of the session shown. */
  tick: number | null;
  lastClose: CloseInfo | null;
  /** The server's Goodbye in the last session, if it sent one. */
  lastGoodbye: { code: number; reason: string } | null;
  lastError: string | null;
  /** Why the last session is not on WebTransport, or null. */
  fallbackReason: string | null;
  /** Certificate hashes passed to the last WebTransport session. */
  certificateHashes: number;
  tokenRequired: boolean | null;
  /** Where the token stands; 'refused' stays until a session opens. */
  token: null | 'missing' | 'sent' | 'accepted' | 'refused';
  /** Why a server could not be read (its protocol version), or null. */
  unsupportedVersion: string | null;
}

/** `detail` of a `tick` event: the fleet changed. */
export interface TickDetail {
  tick: number | null;
  cars: Car[];
  transport: Transport | null;
  server: string | null;
}

/** `detail` of a `state` event. */
export interface StateDetail {
  state: State;
  transport: Transport | null;
  server: string | null;
  reason: string | null;
  retryInMs: number | null;
}

export interface FleetEventMap {
  tick: CustomEvent<TickDetail>;
  state: CustomEvent<StateDetail>;
}

/** A live connection to a fleetcast deployment. */
export declare class FleetConnection extends EventTarget {
  private constructor(options: ConnectOptions);
  readonly state: State;
  /** The open session's transport, else null. */
  readonly transport: Transport | null;
  /** Base URL of the node of the current (or the last) session. */
  readonly server: string | null;
  /** The base URLs this connection may use: the given ones, then those /config.json named. */
  readonly servers: string[];
  /** Every car with a position now (the last session's while reconnecting). */
  readonly cars: Car[];
  readonly area: Area | null;
  readonly tickIntervalMs: number | null;
  readonly stats: Stats;
  /** Ends the session and stops for good (state 'offline'). */
  close(): void;
  addEventListener<K extends keyof FleetEventMap>(
    type: K,
    listener: (this: FleetConnection, ev: FleetEventMap[K]) => unknown,
    options?: boolean | AddEventListenerOptions,
  ): void;
  addEventListener(type: string, listener: EventListenerOrEventListenerObject | null, options?: boolean | AddEventListenerOptions): void;
  removeEventListener<K extends keyof FleetEventMap>(
    type: K,
    listener: (this: FleetConnection, ev: FleetEventMap[K]) => unknown,
    options?: boolean | EventListenerOptions,
  ): void;
  removeEventListener(type: string, listener: EventListenerOrEventListenerObject | null, options?: boolean | EventListenerOptions): void;
}

/** Opens a connection; throws a TypeError naming a bad option. */
export declare function connect(options?: ConnectOptions): FleetConnection;
