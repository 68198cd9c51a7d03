# VezaProvisioner local Exchange host (Windows PowerShell 5.1). Shipped unchanged with the
# package and started by the service as:
#   powershell.exe -NoLogo -NoProfile -NonInteractive -ExecutionPolicy Bypass -File host.ps1
# It reads data only: a hello line, then one JSON request per line on stdin. It never builds
# script text from what it reads: requests name an allow-listed cmdlet whose parameters are
# bound by splatting. The wire is ASCII only; see protocol.py in the same folder for the format.
# This file must stay ASCII (Windows PowerShell reads BOM-less scripts in the ANSI code page).
#
# Exchange's own scripts run here the way the Exchange Management Shell runs them:
# * never under strict mode. Connect-ExchangeServer (ConnectFunctions.ps1) reads $credential,
#   which it sets only for -UserName; strict mode would make that read throw. Strict mode is
#   inherited by child scopes, so it is set only inside this file's own helper functions, which
#   never call Exchange code (a test parses this file and enforces it);
# * with non-terminating errors allowed to pass, as in the shell: Connect-ExchangeServer tries
#   server after server and reports failures as error records, not exceptions;
# * in separate steps, each checked by its effect: after the dot-source Connect-ExchangeServer
#   must exist; after the connect an opened Microsoft.Exchange session and the cmdlets must.

Set-StrictMode -Off
$ErrorActionPreference = 'Stop'
$ProgressPreference = 'SilentlyContinue'
$VerbosePreference = 'SilentlyContinue'
$WarningPreference = 'SilentlyContinue'
$InformationPreference = 'SilentlyContinue'
$ConfirmPreference = 'None'

# The cmdlets this host runs, and the parameters each may receive. Anything else is refused.
$Allowed = @{
    'Get-User'             = @('Identity', 'DomainController')
    'Get-Recipient'        = @('Identity', 'DomainController')
    'Enable-Mailbox'       = @('Identity', 'Alias', 'Database', 'AddressBookPolicy', 'RetentionPolicy', 'DomainController')
    'Enable-RemoteMailbox' = @('Identity', 'Alias', 'RemoteRoutingAddress', 'DomainController')
}
# Without these the host cannot serve CREATE_EMAIL (Enable-RemoteMailbox is for hybrid only).
$Required = @('Get-User', 'Get-Recipient', 'Enable-Mailbox')

# Flattened from every output object as text (or null), so no Exchange type has to serialize.
$Properties = @('Guid', 'DistinguishedName', 'SamAccountName', 'UserPrincipalName', 'Name', 'DisplayName', 'RecipientTypeDetails', 'Alias', 'PrimarySmtpAddress', 'Database')

# Connects of one account are serialized machine-wide: Connect-ExchangeServer rebuilds the
# account's module cache (%APPDATA%\Microsoft\Exchange\RemotePowerShell\<server>), and hosts
# that rebuild it at the same time break each other's import.
$LockPrefix = 'Global\VezaProvisioner-Connect'
$MaxRecords = 20
$MaxText = 1000

$Stdin = [Console]::In
$Stdout = [Console]::Out
$script:Prefix = $null
$script:Transcribing = $false

# ---- own helpers: strict inside, and none of them calls Exchange code ---------------------------

function ConvertTo-AsciiJson {
    param($Value)
    Set-StrictMode -Version 2.0
    # ConvertTo-Json in 5.1 writes non-ASCII characters raw; escape them so the console code
    # page can never garble them.
    $json = ConvertTo-Json -InputObject $Value -Compress -Depth 5
    $builder = New-Object System.Text.StringBuilder
    foreach ($ch in $json.ToCharArray()) {
        $code = [int]$ch
        if ($code -gt 126) {
            [void]$builder.AppendFormat('\u{0:x4}', $code)
        }
        else {
            [void]$builder.Append($ch)
        }
    }
    return $builder.ToString()
}

function Send-Message {
    param([hashtable]$Message)
    Set-StrictMode -Version 2.0
    $Stdout.Write($script:Prefix + (ConvertTo-AsciiJson $Message) + "`n")
    $Stdout.Flush()
}

function Limit-Text {
    param([string]$Text)
    Set-StrictMode -Version 2.0
    if ($Text.Length -gt $MaxText) { return $Text.Substring(0, $MaxText) }
    return $Text
}

function ConvertTo-RecordList {
    # Error records (oldest first) as {message, error_id, target}; target is the server a
    # failed New-PSSession named (its runspace's ConnectionInfo), else the target object's text.
    param([object[]]$Records)
    Set-StrictMode -Version 2.0
    $count = 0
    foreach ($record in $Records) {
        if ($count -ge $MaxRecords) { break }
        $count += 1
        if ($record -is [System.Management.Automation.ErrorRecord]) {
            $target = ''
            $object = $record.TargetObject
            if ($null -ne $object) {
                $info = $object.PSObject.Properties['ConnectionInfo']
                if ($null -ne $info -and $null -ne $info.Value) {
                    $target = [string]$info.Value.ComputerName
                }
                else {
                    $target = [string]$object
                }
            }
            @{
                message  = Limit-Text ([string]$record.Exception.Message)
                error_id = [string]$record.FullyQualifiedErrorId
                target   = Limit-Text $target
            }
        }
        elseif ($record -is [System.Exception]) {
            @{ message = Limit-Text ([string]$record.Message); error_id = ''; target = '' }
        }
    }
}

function Get-ErrorRecords {
    # What $Error holds (newest first), written out oldest first, one by one: callers
    # collect them with @(...).
    Set-StrictMode -Version 2.0
    $records = @($global:Error)
    [array]::Reverse($records)
    foreach ($record in $records) { $record }
}

function Exit-Host {
    param([int]$Code)
    Set-StrictMode -Version 2.0
    if ($script:Transcribing) {
        $null = Stop-Transcript
    }
    exit $Code
}

function Send-StartupError {
    param([string]$Kind, [string]$Detail, [int]$Code, [hashtable]$Extra = @{})
    Set-StrictMode -Version 2.0
    $message = @{ type = 'startup_error'; kind = $Kind; detail = (Limit-Text $Detail) }
    foreach ($key in $Extra.Keys) { $message[$key] = $Extra[$key] }
    Send-Message $message
    Exit-Host $Code
}

function Show-Captured {
    # With a transcript (probe --transcript), show what an Exchange step printed, so the
    # transcript holds it; otherwise it stays silenced.
    param([object[]]$Captured)
    Set-StrictMode -Version 2.0
    if ($script:Transcribing -and $null -ne $Captured) {
        $Captured | Out-Host
    }
}

function Enter-ConnectLock {
    # The machine-wide mutex of this account, or $null when it was not free within the wait.
    param([int]$TimeoutMs)
    Set-StrictMode -Version 2.0
    $sid = [Security.Principal.WindowsIdentity]::GetCurrent().User.Value
    $mutex = New-Object System.Threading.Mutex -ArgumentList $false, ($LockPrefix + '-' + $sid)
    try {
        $acquired = $mutex.WaitOne($TimeoutMs)
    }
    catch [System.Threading.AbandonedMutexException] {
        $acquired = $true  # its last holder died holding it; the mutex is now ours
    }
    if (-not $acquired) {
        $mutex.Dispose()
        return $null
    }
    return $mutex
}

function Exit-ConnectLock {
    param([System.Threading.Mutex]$Mutex)
    Set-StrictMode -Version 2.0
    $Mutex.ReleaseMutex()
    $Mutex.Dispose()
}

function ConvertTo-Flat {
    param($Object)
    Set-StrictMode -Version 2.0
    $flat = [ordered]@{}
    foreach ($name in $Properties) {
        $property = $Object.PSObject.Properties[$name]
        if ($null -ne $property -and $null -ne $property.Value) {
            $flat[$name] = [string]$property.Value
        }
        else {
            $flat[$name] = $null
        }
    }
    return $flat
}

function Read-Request {
    # A checked request @{ id; cmdlet; params }, or the refusal message to send.
    param([string]$Line)
    Set-StrictMode -Version 2.0
    try {
        $request = ConvertFrom-Json -InputObject $Line
        $id = [int]$request.id
        $cmdlet = [string]$request.cmdlet
    }
    catch {
        return @{ refusal = @{ type = 'refused'; id = $null; detail = 'the request is not a JSON object with id, cmdlet and parameters' } }
    }
    if (-not $Allowed.ContainsKey($cmdlet)) {
        return @{ refusal = @{ type = 'refused'; id = $id; detail = ('the cmdlet {0} is not allowed' -f $cmdlet) } }
    }
    try {
        $supplied = @($request.parameters.PSObject.Properties)
    }
    catch {
        return @{ refusal = @{ type = 'refused'; id = $id; detail = 'the request has no parameters object' } }
    }
    $params = @{}
    foreach ($property in $supplied) {
        if ($Allowed[$cmdlet] -notcontains $property.Name) {
            return @{ refusal = @{ type = 'refused'; id = $id; detail = ('{0} does not take the parameter {1}' -f $cmdlet, $property.Name) } }
        }
        $params[$property.Name] = [string]$property.Value
    }
    return @{ refusal = $null; id = $id; cmdlet = $cmdlet; params = $params }
}

function ConvertTo-ErrorMessage {
    param([int]$Id, $Record)
    Set-StrictMode -Version 2.0
    return @{
        type           = 'error'
        id             = $Id
        message        = [string]$Record.Exception.Message
        reason         = [string]$Record.CategoryInfo.Reason
        error_id       = [string]$Record.FullyQualifiedErrorId
        exception_type = $Record.Exception.GetType().FullName
    }
}

# ---- Exchange calls: no strict mode here ---------------------------------------------------------

function Invoke-ExchangeCmdlet {
    # Runs one checked request. The proxy functions Exchange imported run from here.
    param([hashtable]$Checked)
    $cmdlet = $Checked.cmdlet
    $params = $Checked.params
    try {
        $output = @(& $cmdlet @params -ErrorAction Stop)
    }
    catch {
        return ConvertTo-ErrorMessage $Checked.id $_
    }
    $objects = @(foreach ($item in $output) { ConvertTo-Flat $item })
    return @{ type = 'result'; id = $Checked.id; objects = $objects }
}

# ---- startup ---------------------------------------------------------------------------------

# The hello: the session nonce (it frames every line we write), RemoteExchange.ps1's path, how
# long to wait for the connect mutex, and (only from `vezaprovisioner probe --transcript`) a
# transcript file.
$helloLine = $Stdin.ReadLine()
if ($null -eq $helloLine) { exit 2 }
$hello = ConvertFrom-Json -InputObject $helloLine
$script:Prefix = '@@VZP ' + [string]$hello.nonce + ' '
$remoteExchange = [string]$hello.remote_exchange_path
$lockWaitMs = [int]$hello.connect_lock_ms
$transcriptPath = [string]$hello.transcript

if ($transcriptPath) {
    try {
        $null = Start-Transcript -LiteralPath $transcriptPath -Force
        $script:Transcribing = $true
    }
    catch {
        Send-StartupError 'transcript' ([string]$_.Exception.Message) 7 @{ path = $transcriptPath }
    }
}

if (-not (Test-Path -LiteralPath $remoteExchange -PathType Leaf)) {
    Send-StartupError 'remote_exchange_path' ('no file at {0}' -f $remoteExchange) 3 @{ path = $remoteExchange }
}

# Step 1: dot-source RemoteExchange.ps1 here, at script scope, like the shell's shortcut. Its
# banner, tip and console-window resizing may fail or print; what counts is its effect.
$Error.Clear()
$ErrorActionPreference = 'Continue'
$sourceFailure = $null
try {
    $shown = . $remoteExchange *>&1
    Show-Captured $shown
}
catch {
    $sourceFailure = $_
}
$ErrorActionPreference = 'Stop'
if ($null -eq (Get-Command -Name 'Connect-ExchangeServer' -CommandType Function -ErrorAction SilentlyContinue)) {
    $records = @(Get-ErrorRecords)
    if ($null -ne $sourceFailure) { $records += $sourceFailure }
    $list = @(ConvertTo-RecordList $records)
    $said = 'no error record'
    if ($list.Count -gt 0) { $said = $list[$list.Count - 1].message }
    Send-StartupError 'dot_source' ('Connect-ExchangeServer does not exist after dot-sourcing {0}: {1}' -f $remoteExchange, $said) 8 @{ path = $remoteExchange; records = $list }
}

# Step 2: connect, holding this account's connect mutex until the import is done.
$lock = Enter-ConnectLock $lockWaitMs
if ($null -eq $lock) {
    Send-StartupError 'connect_lock' ('another host of this account held {0} for {1} ms' -f $LockPrefix, $lockWaitMs) 6
}
Send-Message @{ type = 'connecting' }
$Error.Clear()
$ErrorActionPreference = 'Continue'
$connectFailure = $null
try {
    $shown = Connect-ExchangeServer -auto -ClientApplication:ManagementShell *>&1
    Show-Captured $shown
}
catch {
    $connectFailure = $_
}
finally {
    $ErrorActionPreference = 'Stop'
    $VerbosePreference = 'SilentlyContinue'
    Exit-ConnectLock $lock
}
$connectRecords = @(Get-ErrorRecords)
if ($null -ne $connectFailure) { $connectRecords += $connectFailure }

# Step 3: check the effect. An opened Microsoft.Exchange session...
$session = @(Get-PSSession -ErrorAction SilentlyContinue | Where-Object { $_.ConfigurationName -eq 'Microsoft.Exchange' -and $_.State -eq 'Opened' })
if ($session.Count -eq 0) {
    $list = @(ConvertTo-RecordList $connectRecords)
    $said = 'no error record'
    if ($list.Count -gt 0) { $said = $list[$list.Count - 1].message }
    Send-StartupError 'connect' ('no Exchange session opened ({0} error records); the last: {1}' -f $list.Count, $said) 4 @{ records = $list }
}
$server = [string]$session[0].ComputerName
$account = [Security.Principal.WindowsIdentity]::GetCurrent().Name

# ...and the cmdlets: none at all means the import of the session's module failed.
$missing = @(foreach ($name in $Allowed.Keys) { if ($null -eq (Get-Command -Name $name -ErrorAction SilentlyContinue)) { $name } })
if ($missing.Count -eq $Allowed.Count) {
    $cache = ''
    if ($env:APPDATA) { $cache = Join-Path $env:APPDATA ('Microsoft\Exchange\RemotePowerShell\' + $server) }
    $list = @(ConvertTo-RecordList $connectRecords)
    Send-StartupError 'module_import' ('a session to {0} is open but no Exchange cmdlet was imported' -f $server) 9 @{ server = $server; user = $account; path = $cache; records = $list }
}
$lacking = @(foreach ($name in $Required) { if ($missing -contains $name) { $name } })
if ($lacking.Count -gt 0) {
    Send-StartupError 'rbac' ('{0} cannot run {1}' -f $account, ($lacking -join ', ')) 5 @{ server = $server; user = $account; missing = $lacking }
}
Send-Message @{ type = 'ready'; server = $server; user = $account }

while ($true) {
    $line = $Stdin.ReadLine()
    if ($null -eq $line) { break }
    if ($line.Length -eq 0) { continue }
    $checked = Read-Request $line
    if ($null -ne $checked.refusal) {
        Send-Message $checked.refusal
    }
    else {
        Send-Message (Invoke-ExchangeCmdlet $checked)
    }
}

# The service closed stdin: release the Exchange session now rather than when it idles out, so
# it stops counting against the account's PowerShell throttling budget.
Get-PSSession -ErrorAction SilentlyContinue | Remove-PSSession -ErrorAction SilentlyContinue
Exit-Host 0
