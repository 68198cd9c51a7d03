# VezaProvisioner local Exchange host (Windows PowerShell 5.1). Shipped unchanged with the
# package and started by the service as:
#   powershell.exe -NoLogo -NoProfile -NonInteractive -ExecutionPolicy Bypass -File host.ps1
# It reads data only: a hello line, then one JSON request per line on stdin. It never builds
# script text from what it reads: requests name an allow-listed cmdlet whose parameters are
# bound by splatting. The wire is ASCII only; see protocol.py in the same folder for the format.
# This file must stay ASCII (Windows PowerShell reads BOM-less scripts in the ANSI code page).

$ErrorActionPreference = 'Stop'
$ProgressPreference = 'SilentlyContinue'
$VerbosePreference = 'SilentlyContinue'
$WarningPreference = 'SilentlyContinue'
$InformationPreference = 'SilentlyContinue'
$ConfirmPreference = 'None'
Set-StrictMode -Version 2.0

# The cmdlets this host runs, and the parameters each may receive. Anything else is refused.
$Allowed = @{
    'Get-User'             = @('Identity', 'DomainController')
    'Get-Recipient'        = @('Identity', 'DomainController')
    'Enable-Mailbox'       = @('Identity', 'Alias', 'Database', 'AddressBookPolicy', 'RetentionPolicy', 'DomainController')
    'Enable-RemoteMailbox' = @('Identity', 'Alias', 'RemoteRoutingAddress', 'DomainController')
}

# Flattened from every output object as text (or null), so no Exchange type has to serialize.
$Properties = @('Guid', 'DistinguishedName', 'SamAccountName', 'UserPrincipalName', 'Name', 'DisplayName', 'RecipientTypeDetails', 'Alias', 'PrimarySmtpAddress', 'Database')

$Stdin = [Console]::In
$Stdout = [Console]::Out
$script:Prefix = $null

function ConvertTo-AsciiJson {
    param($Value)
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
    $Stdout.Write($script:Prefix + (ConvertTo-AsciiJson $Message) + "`n")
    $Stdout.Flush()
}

function Send-StartupError {
    param([string]$Kind, [string]$Detail)
    Send-Message @{ type = 'startup_error'; kind = $Kind; detail = $Detail }
}

function ConvertTo-Flat {
    param($Object)
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

function Invoke-Request {
    param([string]$Line)
    try {
        $request = ConvertFrom-Json -InputObject $Line
        $id = [int]$request.id
        $cmdlet = [string]$request.cmdlet
    }
    catch {
        return @{ type = 'refused'; id = $null; detail = 'the request is not a JSON object with id, cmdlet and parameters' }
    }
    if (-not $Allowed.ContainsKey($cmdlet)) {
        return @{ type = 'refused'; id = $id; detail = ('the cmdlet {0} is not allowed' -f $cmdlet) }
    }
    try {
        $supplied = @($request.parameters.PSObject.Properties)
    }
    catch {
        return @{ type = 'refused'; id = $id; detail = 'the request has no parameters object' }
    }
    $params = @{}
    foreach ($property in $supplied) {
        if ($Allowed[$cmdlet] -notcontains $property.Name) {
            return @{ type = 'refused'; id = $id; detail = ('{0} does not take the parameter {1}' -f $cmdlet, $property.Name) }
        }
        $params[$property.Name] = [string]$property.Value
    }
    try {
        $output = @(& $cmdlet @params -ErrorAction Stop)
        $objects = @(foreach ($item in $output) { ConvertTo-Flat $item })
        return @{ type = 'result'; id = $id; objects = $objects }
    }
    catch {
        $record = $_
        return @{
            type           = 'error'
            id             = $id
            message        = [string]$record.Exception.Message
            reason         = [string]$record.CategoryInfo.Reason
            error_id       = [string]$record.FullyQualifiedErrorId
            exception_type = $record.Exception.GetType().FullName
        }
    }
}

# The hello: the session nonce (it frames every line we write) and RemoteExchange.ps1's path.
$helloLine = $Stdin.ReadLine()
if ($null -eq $helloLine) { exit 2 }
$hello = ConvertFrom-Json -InputObject $helloLine
$script:Prefix = '@@VZP ' + [string]$hello.nonce + ' '
$remoteExchange = [string]$hello.remote_exchange_path

if (-not (Test-Path -LiteralPath $remoteExchange -PathType Leaf)) {
    Send-StartupError 'remote_exchange_path' ('no file at {0}' -f $remoteExchange)
    exit 3
}

# RemoteExchange.ps1 prints a banner and a tip, and resizes a console window that a redirected
# host does not have; Connect-ExchangeServer turns verbose output on. Silence every stream and
# let non-terminating errors pass: success is checked afterwards, not assumed.
$connectError = ''
$ErrorActionPreference = 'Continue'
try {
    . $remoteExchange *> $null
    Connect-ExchangeServer -auto -ClientApplication:ManagementShell *> $null
}
catch {
    $connectError = [string]$_.Exception.Message
}
$ErrorActionPreference = 'Stop'
$VerbosePreference = 'SilentlyContinue'

$session = @(Get-PSSession -ErrorAction SilentlyContinue | Where-Object { $_.ConfigurationName -eq 'Microsoft.Exchange' -and $_.State -eq 'Opened' })
if ($session.Count -eq 0) {
    if (-not $connectError -and $Error.Count -gt 0) { $connectError = [string]$Error[0] }
    Send-StartupError 'connect' $connectError
    exit 4
}
$account = [Security.Principal.WindowsIdentity]::GetCurrent().Name
if ($null -eq (Get-Command -Name 'Enable-Mailbox' -ErrorAction SilentlyContinue)) {
    Send-StartupError 'rbac' $account
    exit 5
}
Send-Message @{ type = 'ready'; server = [string]$session[0].ComputerName; user = $account }

while ($true) {
    $line = $Stdin.ReadLine()
    if ($null -eq $line) { break }
    if ($line.Length -eq 0) { continue }
    Send-Message (Invoke-Request $line)
}

# The service closed stdin: release the Exchange session now rather than when it idles out, so
# it stops counting against the account's PowerShell throttling budget.
Get-PSSession -ErrorAction SilentlyContinue | Remove-PSSession -ErrorAction SilentlyContinue
exit 0
